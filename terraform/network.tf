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

resource "aws_vpc_security_group_ingress_rule" "coordinator_raft" {
  security_group_id            = aws_security_group.coordinator.id
  description                  = "Raft, between coordinators only"
  referenced_security_group_id = aws_security_group.coordinator.id
  ip_protocol                  = "tcp"
  from_port                    = var.raft_port
  to_port                      = var.raft_port
}

resource "aws_vpc_security_group_ingress_rule" "coordinator_from_workers" {
  security_group_id            = aws_security_group.coordinator.id
  description                  = "Worker agents"
  referenced_security_group_id = aws_security_group.worker.id
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
}

resource "aws_vpc_security_group_ingress_rule" "coordinator_api" {
  for_each          = toset(var.api_allowed_cidrs)
  security_group_id = aws_security_group.coordinator.id
  description       = "API clients"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = var.api_port
  to_port           = var.api_port
}

resource "aws_vpc_security_group_ingress_rule" "worker_data" {
  security_group_id            = aws_security_group.worker.id
  description                  = "Gradients between the ranks of a gang (ring all-reduce, NCCL)"
  referenced_security_group_id = aws_security_group.worker.id
  ip_protocol                  = "tcp"
  from_port                    = var.data_port
  to_port                      = var.data_port
}

# Egress: the coordinators and workers reach each other, S3 and the EC2 API over HTTPS.
resource "aws_vpc_security_group_egress_rule" "coordinator_https" {
  security_group_id = aws_security_group.coordinator.id
  description       = "S3, EC2 and SSM APIs"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_egress_rule" "coordinator_peers" {
  security_group_id            = aws_security_group.coordinator.id
  description                  = "Raft peers"
  referenced_security_group_id = aws_security_group.coordinator.id
  ip_protocol                  = "tcp"
  from_port                    = var.raft_port
  to_port                      = var.raft_port
}

resource "aws_vpc_security_group_egress_rule" "worker_https" {
  security_group_id = aws_security_group.worker.id
  description       = "S3 (the cluster store)"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_egress_rule" "worker_coordinators" {
  security_group_id            = aws_security_group.worker.id
  description                  = "The coordinators"
  referenced_security_group_id = aws_security_group.coordinator.id
  ip_protocol                  = "tcp"
  from_port                    = var.api_port
  to_port                      = var.api_port
}

resource "aws_vpc_security_group_egress_rule" "worker_data" {
  security_group_id            = aws_security_group.worker.id
  description                  = "The other ranks of a gang"
  referenced_security_group_id = aws_security_group.worker.id
  ip_protocol                  = "tcp"
  from_port                    = var.data_port
  to_port                      = var.data_port
}
