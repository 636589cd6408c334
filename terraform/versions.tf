# Flotilla on AWS: the cluster store (S3 + KMS), IAM for coordinators and workers, security
# groups, the worker launch template the EC2 provider launches from, and three coordinators with
# stable identities (fixed private IPs on their own network interfaces, their own data volumes).
# See README.md for the variables, `terraform apply`, and what was validated offline.
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.5"
    }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = {
      "flotilla-cluster" = var.cluster_id
    }
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
