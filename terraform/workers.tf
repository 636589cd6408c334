# The worker launch template. Its name is what the EC2 provider looks up
# (`flotilla-<cluster_id>`, coordinator/ec2/src/lib.rs `template_name`): the fleets it launches
# boot from it, with the worker role, IMDSv2 only, encrypted volumes and the user data below (the
# same script as `flotilla_ec2::worker_user_data` with TLS).

locals {
  coordinator_addresses = join(",", [for ip in var.coordinator_private_ips : "${ip}:${var.api_port}"])
  worker_user_data = templatefile("${path.module}/templates/worker.sh.tftpl", {
    coordinators  = local.coordinator_addresses
    join_token    = random_password.token["join"].result
    ca_pem        = trimspace(var.tls_ca_pem)
    cert_pem      = trimspace(var.worker_tls.cert_pem)
    key_pem       = trimspace(var.worker_tls.key_pem)
    data_port     = var.data_port
    metrics_port  = var.metrics_port
    binary_source = var.binary_source
    store_bucket  = aws_s3_bucket.store.bucket
  })
}

resource "aws_launch_template" "worker" {
  name                   = "flotilla-${var.cluster_id}"
  image_id               = var.worker_ami
  vpc_security_group_ids = [aws_security_group.worker.id]
  user_data              = base64encode(local.worker_user_data)
  ebs_optimized          = true
  iam_instance_profile {
    arn = aws_iam_instance_profile.worker.arn
  }
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  monitoring {
    enabled = true
  }
  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      encrypted             = true
      kms_key_id            = aws_kms_key.store.arn
      volume_size           = 100
      volume_type           = "gp3"
      delete_on_termination = true
    }
  }
  tag_specifications {
    resource_type = "instance"
    tags = {
      "flotilla-cluster" = var.cluster_id
    }
  }
  tag_specifications {
    resource_type = "volume"
    tags = {
      "flotilla-cluster" = var.cluster_id
    }
  }
}
