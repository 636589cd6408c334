variable "region" {
  description = "AWS region of the cluster."
  type        = string
}

variable "cluster_id" {
  description = "Cluster name: the flotilla-cluster tag, the launch template flotilla-<cluster_id>, resource names."
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9-]{1,32}$", var.cluster_id))
    error_message = "cluster_id: 1 to 32 characters of a-z, 0-9 and -."
  }
}

variable "vpc_id" {
  description = "The VPC the cluster runs in (existing)."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets, one per availability zone: coordinator i goes to subnet i (3 zones); workers may use all."
  type        = list(string)
  validation {
    condition     = length(var.subnet_ids) >= 3
    error_message = "subnet_ids: at least 3 subnets (one per zone), so the coordinators survive a zone."
  }
}

variable "coordinator_private_ips" {
  description = "Fixed private IPs of the 3 coordinators, each inside the subnet of the same position: their identities (--peers)."
  type        = list(string)
  validation {
    condition     = length(var.coordinator_private_ips) == 3
    error_message = "coordinator_private_ips: exactly 3 addresses."
  }
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the coordinators' API port (users, CI)."
  type        = list(string)
}

variable "coordinator_instance_type" {
  description = "Instance type of the coordinators."
  type        = string
  default     = "m6i.large"
}

variable "coordinator_ami" {
  description = "AMI of the coordinators, with `flotilla` in /usr/local/bin and the AWS CLI (see binary_source)."
  type        = string
}

variable "worker_ami" {
  description = "AMI the workers boot (with `flotilla` and, for GPU types, the NVIDIA driver and NCCL)."
  type        = string
}

variable "binary_source" {
  description = "Where instances get `flotilla`: \"ami\" (already installed) or a key under cluster/ in the store bucket, downloaded at boot."
  type        = string
  default     = "ami"
  validation {
    condition     = var.binary_source == "ami" || startswith(var.binary_source, "cluster/")
    error_message = "binary_source: \"ami\", or a key under cluster/ (the only prefix the instances may read)."
  }
}

variable "market_csv" {
  description = "The autoscaler's price list (the trace format of examples/traces/README.md, one row per pool at hour 0)."
  type        = string
}

variable "max_instances" {
  description = "Instances the autoscaler holds at most."
  type        = number
  default     = 16
}

variable "max_usd_per_hour" {
  description = "What the cluster's instances may cost together, USD per hour."
  type        = number
  default     = 20
}

variable "data_volume_gb" {
  description = "Size of each coordinator's data volume (its Raft log), GiB."
  type        = number
  default     = 50
}

variable "api_port" {
  description = "The coordinators' API port (users and workers)."
  type        = number
  default     = 7100
}

variable "raft_port" {
  description = "The coordinators' Raft port (--raft-peers): open only between coordinators."
  type        = number
  default     = 7101
}

variable "data_port" {
  description = "The workers' data port (gradients between the ranks of a gang)."
  type        = number
  default     = 7200
}

variable "metrics_port" {
  description = "The coordinators' metrics and dashboard port and the workers' metrics port (plain HTTP: /metrics, and the dashboard on coordinators)."
  type        = number
  default     = 9464
}

variable "metrics_allowed_cidrs" {
  description = "CIDRs allowed to reach metrics_port (Prometheus, a VPN). Empty: reach it through a tunnel. The dashboard sends an API token over it: allow only private networks."
  type        = list(string)
  default     = []
}

variable "tls_ca_pem" {
  description = "The cluster CA certificate (`flotilla certs init`)."
  type        = string
}

variable "coordinator_tls" {
  description = "Per coordinator (same order as coordinator_private_ips): certificate and key PEM (`flotilla certs coordinator --host <ip>`)."
  type = list(object({
    cert_pem = string
    key_pem  = string
  }))
  sensitive = true
}

variable "worker_tls" {
  description = "The workers' certificate and key PEM (`flotilla certs worker`)."
  type = object({
    cert_pem = string
    key_pem  = string
  })
  sensitive = true
}
