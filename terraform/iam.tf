# IAM: exactly the AWS actions the code calls (scripts/terraform_check.py compares these
# policies with the calls it finds in coordinator/ec2/src/lib.rs, store/src/lib.rs and the
# coordinators' boot script), each on the narrowest resources.

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# ---- coordinators ----

resource "aws_iam_role" "coordinator" {
  name_prefix        = "flotilla-${var.cluster_id}-coord-"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_instance_profile" "coordinator" {
  name_prefix = "flotilla-${var.cluster_id}-coord-"
  role        = aws_iam_role.coordinator.name
}

locals {
  ec2_arn         = "arn:${data.aws_partition.current.partition}:ec2:${var.region}:${data.aws_caller_identity.current.account_id}"
  launch_template = "${local.ec2_arn}:launch-template/${aws_launch_template.worker.id}"
}

# The EC2 provider (coordinator/ec2/src/lib.rs).
data "aws_iam_policy_document" "coordinator_provider" {
  # Describe* calls take no resource-level permissions.
  statement {
    sid       = "Describe"
    actions   = ["ec2:DescribeInstances", "ec2:DescribeLaunchTemplates", "ec2:DescribeSubnets", "ec2:DescribeSpotPriceHistory"]
    resources = ["*"]
  }
  # The fleet, only from the cluster's launch template.
  statement {
    sid       = "FleetFromTheTemplate"
    actions   = ["ec2:CreateFleet", "ec2:RunInstances"]
    resources = [local.launch_template]
  }
  # What the fleet creates, only tagged with this cluster.
  statement {
    sid       = "LaunchTaggedInstances"
    actions   = ["ec2:CreateFleet", "ec2:RunInstances"]
    resources = ["${local.ec2_arn}:instance/*", "${local.ec2_arn}:volume/*", "${local.ec2_arn}:network-interface/*", "${local.ec2_arn}:fleet/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/flotilla-cluster"
      values   = [var.cluster_id]
    }
  }
  # What the fleet uses as it is.
  statement {
    sid     = "LaunchInto"
    actions = ["ec2:CreateFleet", "ec2:RunInstances"]
    resources = [
      "arn:${data.aws_partition.current.partition}:ec2:${var.region}::image/*",
      "${local.ec2_arn}:subnet/*",
      "${local.ec2_arn}:security-group/${aws_security_group.worker.id}",
      "${local.ec2_arn}:key-pair/*",
    ]
  }
  # Tags only as part of a launch.
  statement {
    sid       = "TagOnCreate"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn}:*/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["CreateFleet", "RunInstances"]
    }
  }
  # Terminate only the cluster's instances.
  statement {
    sid       = "TerminateOwn"
    actions   = ["ec2:TerminateInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/flotilla-cluster"
      values   = [var.cluster_id]
    }
  }
  # The provider creates the template when it is missing; this module creates it first, so
  # the call only happens if someone deletes it, and then only under the cluster's name.
  statement {
    sid       = "TemplateUnderTheClusterName"
    actions   = ["ec2:CreateLaunchTemplate"]
    resources = ["${local.ec2_arn}:launch-template/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/flotilla-cluster"
      values   = [var.cluster_id]
    }
  }
  # The workers' role, only to EC2.
  statement {
    sid       = "PassTheWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

# The cluster store (store/src/lib.rs), for coordinators and workers alike.
data "aws_iam_policy_document" "store" {
  statement {
    sid       = "ListTheClusterPrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.store.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["cluster/*", "cluster"]
    }
  }
  statement {
    sid       = "ObjectsUnderTheClusterPrefix"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${local.store_prefix}/*"]
  }
  statement {
    sid       = "TheStoreKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.store.arn]
  }
}

# The coordinators' boot script: their tokens.
data "aws_iam_policy_document" "coordinator_boot" {
  statement {
    sid       = "ReadTheTokens"
    actions   = ["ssm:GetParameter"]
    resources = [for p in aws_ssm_parameter.token : p.arn]
  }
}

resource "aws_iam_role_policy" "coordinator_provider" {
  name   = "provider"
  role   = aws_iam_role.coordinator.id
  policy = data.aws_iam_policy_document.coordinator_provider.json
}

resource "aws_iam_role_policy" "coordinator_store" {
  name   = "store"
  role   = aws_iam_role.coordinator.id
  policy = data.aws_iam_policy_document.store.json
}

resource "aws_iam_role_policy" "coordinator_boot" {
  name   = "boot"
  role   = aws_iam_role.coordinator.id
  policy = data.aws_iam_policy_document.coordinator_boot.json
}

# ---- workers ----

resource "aws_iam_role" "worker" {
  name_prefix        = "flotilla-${var.cluster_id}-worker-"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_instance_profile" "worker" {
  name_prefix = "flotilla-${var.cluster_id}-worker-"
  role        = aws_iam_role.worker.name
}

resource "aws_iam_role_policy" "worker_store" {
  name   = "store"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.store.json
}
