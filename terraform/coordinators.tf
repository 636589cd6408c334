# Three coordinators with stable identities: each keeps its private IP (its own network
# interface, the --peers address) and its Raft log (its own encrypted data volume) when the
# instance is replaced. Tokens live in SSM SecureString parameters; the boot script reads them.

resource "random_password" "token" {
  for_each = toset(["api", "submit", "read", "join", "peer"])
  length   = 40
  special  = false
}

resource "aws_ssm_parameter" "token" {
  for_each = random_password.token
  name     = "/flotilla/${var.cluster_id}/${each.key}-token"
  type     = "SecureString"
  key_id   = aws_kms_key.store.arn
  value    = each.value.result
}

resource "aws_network_interface" "coordinator" {
  count           = 3
  subnet_id       = var.subnet_ids[count.index]
  private_ips     = [var.coordinator_private_ips[count.index]]
  security_groups = [aws_security_group.coordinator.id]
}

data "aws_subnet" "coordinator" {
  count = 3
  id    = var.subnet_ids[count.index]
}

resource "aws_ebs_volume" "coordinator_data" {
  count             = 3
  availability_zone = data.aws_subnet.coordinator[count.index].availability_zone
  size              = var.data_volume_gb
  type              = "gp3"
  encrypted         = true
  kms_key_id        = aws_kms_key.store.arn
}

resource "aws_instance" "coordinator" {
  count                = 3
  ami                  = var.coordinator_ami
  instance_type        = var.coordinator_instance_type
  iam_instance_profile = aws_iam_instance_profile.coordinator.name
  ebs_optimized        = true
  monitoring           = true
  user_data_base64 = base64encode(templatefile("${path.module}/templates/coordinator.sh.tftpl", {
    id                   = count.index + 1
    cluster_id           = var.cluster_id
    region               = var.region
    listen               = "${var.coordinator_private_ips[count.index]}:${var.api_port}"
    metrics_listen       = "${var.coordinator_private_ips[count.index]}:${var.metrics_port}"
    peers                = join(",", [for i, ip in var.coordinator_private_ips : "${i + 1}=${ip}:${var.api_port}"])
    raft_peers           = join(",", [for i, ip in var.coordinator_private_ips : "${i + 1}=${ip}:${var.raft_port}"])
    store_uri            = local.store_uri
    store_bucket         = aws_s3_bucket.store.bucket
    binary_source        = var.binary_source
    ca_pem               = trimspace(var.tls_ca_pem)
    cert_pem             = trimspace(var.coordinator_tls[count.index].cert_pem)
    key_pem              = trimspace(var.coordinator_tls[count.index].key_pem)
    worker_cert_pem      = trimspace(var.worker_tls.cert_pem)
    worker_key_pem       = trimspace(var.worker_tls.key_pem)
    market_csv           = var.market_csv
    worker_ami           = var.worker_ami
    worker_subnets       = join(" ", [for s in data.aws_subnet.coordinator : "--ec2-subnet ${s.availability_zone}=${s.id}"])
    worker_sg            = aws_security_group.worker.id
    max_instances        = var.max_instances
    max_usd_per_hour     = var.max_usd_per_hour
    token_parameter_root = "/flotilla/${var.cluster_id}"
  }))
  network_interface {
    network_interface_id = aws_network_interface.coordinator[count.index].id
    device_index         = 0
  }
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  root_block_device {
    encrypted   = true
    kms_key_id  = aws_kms_key.store.arn
    volume_type = "gp3"
  }
  tags = {
    Name = "flotilla-${var.cluster_id}-coordinator-${count.index + 1}"
  }
}

resource "aws_volume_attachment" "coordinator_data" {
  count       = 3
  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.coordinator_data[count.index].id
  instance_id = aws_instance.coordinator[count.index].id
}
