# The cluster store: checkpoints, job logs, model artifacts, inference staging (s3://bucket/cluster).

resource "aws_kms_key" "store" {
  description             = "flotilla ${var.cluster_id}: the cluster store, EBS volumes and token parameters"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "store" {
  name          = "alias/flotilla-${var.cluster_id}"
  target_key_id = aws_kms_key.store.key_id
}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_111:A key policy's "*" resource means this key only; the account root administers its own key.
  #checkov:skip=CKV_AWS_356:As above: in a key policy the resource "*" is the key itself.
  #checkov:skip=CKV_AWS_109:As above: only the account administers the key; the roles use it through their own policies.
  # The account administers the key; the roles below get use through their own policies.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
  # EC2 encrypts the workers' and coordinators' volumes with it (Auto Scaling-free launches
  # through CreateFleet use the caller's grant; the service uses the key on its behalf).
  statement {
    sid       = "Ec2UsesForVolumes"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey", "kms:CreateGrant"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.coordinator.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["ec2.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_s3_bucket" "store" {
  bucket_prefix = "flotilla-${var.cluster_id}-"
  #checkov:skip=CKV_AWS_144:Cross-region replication is a deployment choice; checkpoints are recomputable, models can be exported.
  #checkov:skip=CKV_AWS_18:Access logging needs a second bucket the operator owns; enable it there (server_access_logging) if required.
  #checkov:skip=CKV2_AWS_62:No consumer of event notifications: the coordinators record every object they care about through Raft.
  #checkov:skip=CKV2_AWS_61:The lifecycle configuration is the aws_s3_bucket_lifecycle_configuration below.
}

resource "aws_s3_bucket_versioning" "store" {
  bucket = aws_s3_bucket.store.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "store" {
  bucket = aws_s3_bucket.store.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.store.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "store" {
  bucket                  = aws_s3_bucket.store.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "store" {
  bucket = aws_s3_bucket.store.id
  rule {
    id     = "abort-incomplete-uploads-and-expire-old-versions"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
  }
}

resource "aws_s3_bucket_policy" "store" {
  bucket = aws_s3_bucket.store.id
  policy = data.aws_iam_policy_document.store_tls_only.json
}

data "aws_iam_policy_document" "store_tls_only" {
  statement {
    sid       = "DenyPlaintext"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.store.arn, "${aws_s3_bucket.store.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

locals {
  store_uri    = "s3://${aws_s3_bucket.store.bucket}/cluster"
  store_prefix = "${aws_s3_bucket.store.arn}/cluster"
}
