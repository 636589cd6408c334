# Security groups. The coordinators' Raft port (--raft-peers) is open only between
# coordinators; their API port to the workers and the API CIDRs. The workers' data port is open
# only among workers. (Each service also checks its own credentials: API tokens; a worker
# certificate and the join token; a coordinator certificate and the peer token.)

resource "aws_security_group" "coordinator" {
  name_prefix = "flotilla-${var.cluster_id}-coord-"
  description = "flotilla ${var.cluster_id} coordinators"
  vpc_id      = var.vpc_id
}

resource "aws_security_group" "worker" {
  name_prefix = "flotilla-${var.cluster_id}-worker-"
  description = "flotilla ${var.cluster_id} workers"
  vpc_id      = var.vpc_id
}

locals {
  groups = {
    coordinator = aws_security_group.coordinator.id
    worker      = aws_security_group.worker.id
  }
  # The whole network policy in one table: the group a rule belongs to, its direction, the
  # other side (one of the groups, or a CIDR) and the TCP port. Nothing else is open.
  rules = merge(
    {
      coordinator_raft_in = {
        group = "coordinator", ingress = true, peer = "coordinator", cidr = null, port = var.raft_port
        description = "Raft, between coordinators only"
      }
      coordinator_workers_in = {
        group = "coordinator", ingress = true, peer = "worker", cidr = null, port = var.api_port
        description = "Worker agents"
      }
      worker_data_in = {
        group = "worker", ingress = true, peer = "worker", cidr = null, port = var.data_port
        description = "Gradients between the ranks of a gang (ring all-reduce, NCCL)"
      }
      # Egress: the coordinators and workers reach each other, S3 and the EC2 API over HTTPS.
      coordinator_https_out = {
        group = "coordinator", ingress = false, peer = null, cidr = "0.0.0.0/0", port = 443
        description = "S3, EC2 and SSM APIs"
      }
      coordinator_raft_out = {
        group = "coordinator", ingress = false, peer = "coordinator", cidr = null, port = var.raft_port
        description = "Raft peers"
      }
      worker_https_out = {
        group = "worker", ingress = false, peer = null, cidr = "0.0.0.0/0", port = 443
        description = "S3 (the cluster store)"
      }
      worker_coordinators_out = {
        group = "worker", ingress = false, peer = "coordinator", cidr = null, port = var.api_port
        description = "The coordinators"
      }
      worker_data_out = {
        group = "worker", ingress = false, peer = "worker", cidr = null, port = var.data_port
        description = "The other ranks of a gang"
      }
    },
    {
      for cidr in var.api_allowed_cidrs : "coordinator_api_in_${cidr}" => {
        group = "coordinator", ingress = true, peer = null, cidr = cidr, port = var.api_port
        description = "API clients"
      }
    },
    {
      for cidr in var.metrics_allowed_cidrs : "coordinator_metrics_in_${cidr}" => {
        group = "coordinator", ingress = true, peer = null, cidr = cidr, port = var.metrics_port
        description = "Prometheus and the dashboard"
      }
    },
    {
      for cidr in var.metrics_allowed_cidrs : "worker_metrics_in_${cidr}" => {
        group = "worker", ingress = true, peer = null, cidr = cidr, port = var.metrics_port
        description = "Prometheus (agent metrics)"
      }
    },
  )
}

resource "aws_vpc_security_group_ingress_rule" "rule" {
  for_each                     = { for name, rule in local.rules : name => rule if rule.ingress }
  security_group_id            = local.groups[each.value.group]
  description                  = each.value.description
  referenced_security_group_id = each.value.peer == null ? null : local.groups[each.value.peer]
  cidr_ipv4                    = each.value.cidr
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
}

resource "aws_vpc_security_group_egress_rule" "rule" {
  for_each                     = { for name, rule in local.rules : name => rule if !rule.ingress }
  security_group_id            = local.groups[each.value.group]
  description                  = each.value.description
  referenced_security_group_id = each.value.peer == null ? null : local.groups[each.value.peer]
  cidr_ipv4                    = each.value.cidr
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
}
