output "coordinator_addresses" {
  description = "The coordinators' API addresses (FLOTILLA_COORDINATOR)."
  value       = local.coordinator_addresses
}

output "store_uri" {
  description = "The cluster store."
  value       = local.store_uri
}

output "cluster_file" {
  description = "A .flotilla/cluster.toml-style summary for the CLI (the tokens are in SSM: /flotilla/<cluster_id>/*-token)."
  value       = <<-EOT
    # FLOTILLA_COORDINATOR=${local.coordinator_addresses}
    # FLOTILLA_TLS_CA=<the CA file given as tls_ca_pem>
    # FLOTILLA_TOKEN=$(aws ssm get-parameter --with-decryption --name /flotilla/${var.cluster_id}/submit-token --query Parameter.Value --output text)
    store = "${local.store_uri}"
  EOT
}

output "dashboard" {
  description = "The dashboard (and Prometheus targets: every coordinator's and worker's metrics_port). Reach it from metrics_allowed_cidrs or through a tunnel."
  value       = "FLOTILLA_TOKEN=$(aws ssm get-parameter --with-decryption --name /flotilla/${var.cluster_id}/read-token --query Parameter.Value --output text) flotilla dashboard --address ${var.coordinator_private_ips[0]}:${var.metrics_port}"
}
