//! The EC2 provider: Flotilla's [`Provider`] on Amazon EC2 (or anything that speaks its API,
//! such as moto in the tests).
//!
//! ```text
//!   launch(spec) ─▶ instances tagged flotilla-launch-token=<token>? ─yes─▶ return them
//!                   │ no
//!                   ▼
//!        launch template (created once per cluster: AMI, user data that starts
//!        `flotilla worker`, instance tags) ─▶ CreateFleet type=instant, client token,
//!        spot price-capacity-optimized, overrides = the pool's type in its zone's subnets
//!        ─▶ instance ids (partial fulfilment returns what launched; none launched for lack of
//!           capacity is ProviderError::Capacity, so the autoscaler backs off that pool)
//!   describe(tags) ─▶ DescribeInstances filtered by tag   terminate(ids) ─▶ TerminateInstances
//!   spot_prices(types) ─▶ DescribeSpotPriceHistory (the newest price per type and zone)
//! ```
//!
//! Endpoint, region and credentials come from the standard AWS configuration (environment,
//! profile, instance role), so `AWS_ENDPOINT_URL` points it at moto. TLS is rustls with ring.
//! Every instance carries the cluster's tags and its launch token, so a coordinator that
//! restarts, or a new leader, finds what is already running instead of launching it twice.

use std::collections::BTreeMap;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, FleetLaunchTemplateConfigRequest, FleetLaunchTemplateOverridesRequest,
    FleetLaunchTemplateSpecificationRequest, FleetType, InstanceStateName, InstanceType, RequestLaunchTemplateData,
    ResourceType, SpotAllocationStrategy, SpotOptionsRequest, Tag, TagSpecification,
    TargetCapacitySpecificationRequest,
};
use flotilla_coordinator::provider::{
    Instance, InstanceState, LAUNCH_COUNT_MAX, LAUNCH_TOKEN_TAG, LaunchSpec, Provider, ProviderError,
};

/// EC2 error codes that mean "no capacity of this kind now": back off and try elsewhere.
const CAPACITY_CODES: [&str; 8] = [
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "UnfulfillableCapacity",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "InsufficientHostCapacity",
];
/// Longest user-data script (EC2's limit is 16 KiB before base64).
const USER_DATA_BYTES_MAX: usize = 16 * 1024;
/// Instances listed by one describe at most.
const DESCRIBE_INSTANCES_MAX: usize = 10_000;

/// What the provider needs besides the standard AWS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Config {
    /// Names the launch template (`flotilla-<cluster_id>`).
    pub cluster_id: String,
    /// The AMI workers boot (with `flotilla` installed).
    pub image_id: String,
    /// Availability zone -> subnet id. Empty: the subnets of the region's default VPC.
    pub subnets: BTreeMap<String, String>,
    pub security_group_ids: Vec<String>,
    pub key_name: Option<String>,
    /// The boot script (it starts `flotilla worker` with the coordinator addresses and the
    /// join token); see [`worker_user_data`].
    pub user_data: String,
}

/// The boot script of a worker instance: starts the agent against the cluster. The agent reads
/// its identity from EC2's metadata (instance id, type, zone, GPUs) and advertises the
/// instance's private address (`local-ipv4`) for its data port; S3 uses the instance role
/// (`FLOTILLA_INSTANCE_ROLE=1`) and the instance's region. With `tls`, the script writes the cluster CA and the worker's
/// certificate and key (0600) to /etc/flotilla/tls and the agent speaks mutual TLS.
pub fn worker_user_data(coordinators: &str, join_token: &str, tls: Option<&WorkerTls>) -> String {
    let mut script = format!(
        "#!/bin/bash\nset -e\nexport FLOTILLA_COORDINATOR='{coordinators}'\nexport FLOTILLA_JOIN_TOKEN='{join_token}'\n"
    );
    if let Some(tls) = tls {
        script.push_str("umask 077\nmkdir -p /etc/flotilla/tls\n");
        for (file, pem) in [("ca.pem", &tls.ca_pem), ("worker.pem", &tls.cert_pem), ("worker-key.pem", &tls.key_pem)] {
            script
                .push_str(&format!("cat > /etc/flotilla/tls/{file} <<'FLOTILLA_PEM'\n{}\nFLOTILLA_PEM\n", pem.trim()));
        }
        script.push_str(
            "export FLOTILLA_TLS_CA=/etc/flotilla/tls/ca.pem FLOTILLA_TLS_CERT=/etc/flotilla/tls/worker.pem \
             FLOTILLA_TLS_KEY=/etc/flotilla/tls/worker-key.pem\n",
        );
    }
    script.push_str(
        "token=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)\n\
         export AWS_REGION=\"$(curl -s -H \"X-aws-ec2-metadata-token: $token\" \
         http://169.254.169.254/latest/meta-data/placement/region)\"\n\
         export FLOTILLA_INSTANCE_ROLE=1\n\
         exec flotilla worker --imds-endpoint ec2 --data-addr 0.0.0.0:7200\n",
    );
    script
}

/// What a worker instance needs for TLS (PEM text, written by its boot script).
pub struct WorkerTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Overrides of the standard AWS configuration (tests point these at moto).
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    /// (access key id, secret): skips the credential chain.
    pub static_credentials: Option<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    #[error("EC2 configuration: {0}")]
    Config(String),
}

pub struct Ec2Provider {
    client: Client,
    config: Ec2Config,
    template: tokio::sync::OnceCell<String>,
    subnets: tokio::sync::OnceCell<BTreeMap<String, String>>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Failed(format!("{what}: {e}"))
}

/// The message of an SDK error, with its service code when there is one.
fn describe_error<E: aws_sdk_ec2::error::ProvideErrorMetadata + std::fmt::Debug>(
    e: &aws_sdk_ec2::error::SdkError<E>,
) -> String {
    match e.as_service_error() {
        Some(service) => format!("{}: {}", service.code().unwrap_or("error"), service.message().unwrap_or("")),
        None => format!("{e}"),
    }
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

impl Ec2Provider {
    /// A provider on the standard AWS configuration (AWS_REGION, AWS_ENDPOINT_URL, credentials
    /// from the environment, profile or instance role), with `connection`'s overrides.
    pub async fn connect(config: Ec2Config, connection: Connection) -> Result<Ec2Provider, Ec2Error> {
        if config.image_id.is_empty() {
            return Err(Ec2Error::Config("an AMI (image id) is required".into()));
        }
        if config.user_data.len() > USER_DATA_BYTES_MAX {
            return Err(Ec2Error::Config(format!(
                "user data is {} bytes; EC2 takes at most {USER_DATA_BYTES_MAX}",
                config.user_data.len()
            )));
        }
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
        if let Some(endpoint) = connection.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(region) = connection.region {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some((key, secret)) = connection.static_credentials {
            loader =
                loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(key, secret, None, None, "flotilla"));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(Ec2Error::Config("no AWS region: set AWS_REGION (or a profile's region)".into()));
        }
        Ok(Ec2Provider {
            client: Client::new(&sdk),
            config,
            template: tokio::sync::OnceCell::new(),
            subnets: tokio::sync::OnceCell::new(),
        })
    }

    fn template_name(&self) -> String {
        format!("flotilla-{}", self.config.cluster_id)
    }

    /// The cluster's launch template id, created on first use (or found, after a restart).
    async fn template_id(&self) -> Result<String, ProviderError> {
        self.template
            .get_or_try_init(|| async {
                let name = self.template_name();
                let found = self.client.describe_launch_templates().launch_template_names(&name).send().await;
                if let Ok(found) = found
                    && let Some(id) = found.launch_templates().first().and_then(|t| t.launch_template_id())
                {
                    return Ok(id.to_string());
                }
                let user_data = base64(self.config.user_data.as_bytes());
                let mut data =
                    RequestLaunchTemplateData::builder().image_id(&self.config.image_id).user_data(user_data);
                for group in &self.config.security_group_ids {
                    data = data.security_group_ids(group);
                }
                if let Some(key) = &self.config.key_name {
                    data = data.key_name(key);
                }
                let created = self
                    .client
                    .create_launch_template()
                    .launch_template_name(&name)
                    .launch_template_data(data.build())
                    .send()
                    .await
                    .map_err(|e| failed("creating the launch template", describe_error(&e)))?;
                created
                    .launch_template()
                    .and_then(|t| t.launch_template_id())
                    .map(str::to_string)
                    .ok_or_else(|| failed("creating the launch template", "no id in the answer"))
            })
            .await
            .cloned()
    }

    /// The zones instances can launch in: those of the configured subnets, or those where the
    /// region's default VPC has a default subnet (asked once, then kept).
    pub async fn subnet_zones(&self) -> Result<Vec<String>, ProviderError> {
        Ok(self.subnets().await?.into_keys().collect())
    }

    /// Zone -> subnet: the configured ones, or the default VPC's.
    async fn subnets(&self) -> Result<BTreeMap<String, String>, ProviderError> {
        self.subnets
            .get_or_try_init(|| async {
                if !self.config.subnets.is_empty() {
                    return Ok(self.config.subnets.clone());
                }
                let answer = self
                    .client
                    .describe_subnets()
                    .filters(aws_sdk_ec2::types::Filter::builder().name("default-for-az").values("true").build())
                    .send()
                    .await
                    .map_err(|e| failed("listing subnets", describe_error(&e)))?;
                let mut subnets = BTreeMap::new();
                for subnet in answer.subnets() {
                    if let (Some(zone), Some(id)) = (subnet.availability_zone(), subnet.subnet_id()) {
                        subnets.entry(zone.to_string()).or_insert_with(|| id.to_string());
                    }
                }
                if subnets.is_empty() {
                    return Err(failed("listing subnets", "no default subnets; configure subnets per zone"));
                }
                Ok(subnets)
            })
            .await
            .cloned()
    }

    async fn describe_filtered(
        &self,
        filters: Vec<aws_sdk_ec2::types::Filter>,
    ) -> Result<Vec<Instance>, ProviderError> {
        let mut out = Vec::new();
        let mut pages = self.client.describe_instances().set_filters(Some(filters)).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| failed("describing instances", describe_error(&e)))?;
            for reservation in page.reservations() {
                for i in reservation.instances() {
                    if out.len() >= DESCRIBE_INSTANCES_MAX {
                        return Ok(out);
                    }
                    out.push(to_instance(i));
                }
            }
        }
        out.sort_by(|a: &Instance, b: &Instance| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The newest spot price per (instance type, zone), USD per hour.
    pub async fn spot_prices(
        &self,
        instance_types: &[String],
    ) -> Result<BTreeMap<(String, String), f64>, ProviderError> {
        let mut request = self.client.describe_spot_price_history().product_descriptions("Linux/UNIX");
        for t in instance_types {
            request = request.instance_types(InstanceType::from(t.as_str()));
        }
        let answer = request.send().await.map_err(|e| failed("reading spot prices", describe_error(&e)))?;
        let mut newest: BTreeMap<(String, String), (i64, f64)> = BTreeMap::new();
        for p in answer.spot_price_history() {
            let (Some(t), Some(zone), Some(price)) = (p.instance_type(), p.availability_zone(), p.spot_price()) else {
                continue;
            };
            let Ok(price) = price.parse::<f64>() else { continue };
            let at = p.timestamp().map_or(0, |t| t.secs());
            let key = (t.as_str().to_string(), zone.to_string());
            if newest.get(&key).is_none_or(|(seen, _)| at >= *seen) {
                newest.insert(key, (at, price));
            }
        }
        Ok(newest.into_iter().map(|(k, (_, p))| (k, p)).collect())
    }
}

fn to_instance(i: &aws_sdk_ec2::types::Instance) -> Instance {
    let tags: BTreeMap<String, String> = i
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
        .collect();
    let state = match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending | InstanceStateName::Running) => InstanceState::Running,
        _ => InstanceState::Terminated,
    };
    Instance {
        id: i.instance_id().unwrap_or_default().to_string(),
        instance_type: i.instance_type().map(|t| t.as_str().to_string()).unwrap_or_default(),
        zone: i.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_string(),
        spot: i.instance_lifecycle().is_some_and(|l| l.as_str() == "spot"),
        state,
        tags,
        launched_at_unix_ms: i.launch_time().map_or(0, |t| t.to_millis().unwrap_or(0).max(0) as u64),
    }
}

fn tag_filter(key: &str, value: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder().name(format!("tag:{key}")).values(value).build()
}

impl Provider for Ec2Provider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Vec<Instance>, ProviderError> {
        {
            if spec.count == 0 || spec.count > LAUNCH_COUNT_MAX || spec.on_demand_base > spec.count {
                return Err(ProviderError::Invalid(format!(
                    "count {} (1 to {LAUNCH_COUNT_MAX}) with {} on-demand",
                    spec.count, spec.on_demand_base
                )));
            }
            if spec.client_token.is_empty() || spec.client_token.len() > 64 {
                return Err(ProviderError::Invalid("the client token must be 1 to 64 characters".into()));
            }
            // Idempotent even where client tokens are ignored: what this token launched is tagged.
            let earlier: Vec<Instance> = self
                .describe_filtered(vec![tag_filter(LAUNCH_TOKEN_TAG, &spec.client_token)])
                .await?
                .into_iter()
                .filter(|i| i.state == InstanceState::Running)
                .collect();
            if !earlier.is_empty() {
                return Ok(earlier);
            }
            let template = self.template_id().await?;
            let subnets = self.subnets().await?;
            let chosen: Vec<&String> = match &spec.zone {
                Some(zone) => vec![subnets.get(zone).ok_or_else(|| {
                    ProviderError::Invalid(format!("no subnet for zone `{zone}` (known: {:?})", subnets.keys()))
                })?],
                None => subnets.values().collect(),
            };
            let mut config = FleetLaunchTemplateConfigRequest::builder().launch_template_specification(
                FleetLaunchTemplateSpecificationRequest::builder()
                    .launch_template_id(&template)
                    .version("$Latest")
                    .build(),
            );
            for subnet in chosen {
                config = config.overrides(
                    FleetLaunchTemplateOverridesRequest::builder()
                        .instance_type(InstanceType::from(spec.instance_type.as_str()))
                        .subnet_id(subnet)
                        .build(),
                );
            }
            let on_demand = if spec.spot { spec.on_demand_base } else { spec.count };
            let capacity = TargetCapacitySpecificationRequest::builder()
                .total_target_capacity(spec.count as i32)
                .on_demand_target_capacity(on_demand as i32)
                .spot_target_capacity((spec.count - on_demand) as i32)
                .default_target_capacity_type(if spec.spot {
                    DefaultTargetCapacityType::Spot
                } else {
                    DefaultTargetCapacityType::OnDemand
                })
                .build();
            let mut tags = TagSpecification::builder().resource_type(ResourceType::Instance);
            for (k, v) in &spec.tags {
                tags = tags.tags(tag(k, v));
            }
            tags = tags.tags(tag(LAUNCH_TOKEN_TAG, &spec.client_token));
            let answer = self
                .client
                .create_fleet()
                .r#type(FleetType::Instant)
                .client_token(&spec.client_token)
                .launch_template_configs(config.build())
                .target_capacity_specification(capacity)
                .spot_options(
                    SpotOptionsRequest::builder()
                        .allocation_strategy(SpotAllocationStrategy::PriceCapacityOptimized)
                        .build(),
                )
                .tag_specifications(tags.build())
                .send()
                .await
                .map_err(|e| {
                    let message = describe_error(&e);
                    if CAPACITY_CODES.iter().any(|c| message.starts_with(c)) {
                        ProviderError::Capacity(message)
                    } else {
                        failed("CreateFleet", message)
                    }
                })?;
            let ids: Vec<String> = answer.instances().iter().flat_map(|i| i.instance_ids().iter().cloned()).collect();
            let errors: Vec<String> = answer
                .errors()
                .iter()
                .map(|e| format!("{}: {}", e.error_code().unwrap_or("error"), e.error_message().unwrap_or("")))
                .collect();
            if ids.is_empty() {
                let message = if errors.is_empty() { "no instances launched".to_string() } else { errors.join("; ") };
                return Err(
                    if errors.iter().any(|e| CAPACITY_CODES.iter().any(|c| e.starts_with(c))) || errors.is_empty() {
                        ProviderError::Capacity(message)
                    } else {
                        failed("CreateFleet", message)
                    },
                );
            }
            if !errors.is_empty() {
                tracing::warn!(launched = ids.len(), wanted = spec.count, errors = ?errors, "fleet partly fulfilled");
            }
            // Describe is eventually consistent: what it does not show yet comes from the
            // fleet's answer (never an error: these instances run and must be recorded).
            let filter =
                aws_sdk_ec2::types::Filter::builder().name("instance-id").set_values(Some(ids.clone())).build();
            let mut launched = self.describe_filtered(vec![filter]).await.unwrap_or_default();
            let now_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let mut tags = spec.tags.clone();
            tags.insert(LAUNCH_TOKEN_TAG.to_string(), spec.client_token.clone());
            for fleet_instance in answer.instances() {
                let spot = fleet_instance.lifecycle().is_some_and(|l| l.as_str() == "spot");
                for id in fleet_instance.instance_ids() {
                    if !launched.iter().any(|i| i.id == *id) {
                        launched.push(Instance {
                            id: id.clone(),
                            instance_type: spec.instance_type.clone(),
                            zone: spec.zone.clone().unwrap_or_default(),
                            spot,
                            state: InstanceState::Running,
                            tags: tags.clone(),
                            launched_at_unix_ms: now_ms,
                        });
                    }
                }
            }
            Ok(launched)
        }
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), ProviderError> {
        {
            if ids.is_empty() {
                return Ok(());
            }
            self.client
                .terminate_instances()
                .set_instance_ids(Some(ids.to_vec()))
                .send()
                .await
                .map_err(|e| failed("terminating instances", describe_error(&e)))?;
            Ok(())
        }
    }

    async fn describe(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Instance>, ProviderError> {
        self.describe_filtered(tags.iter().map(|(k, v)| tag_filter(k, v)).collect()).await
    }
}

/// Standard base64 (user data must be base64 in a launch template).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"echo hi"), "ZWNobyBoaQ==");
    }

    #[test]
    fn user_data_starts_the_agent_with_the_cluster() {
        let script = worker_user_data("10.0.0.1:7100", "tok", None);
        assert!(script.starts_with("#!/bin/bash"));
        assert!(script.contains("FLOTILLA_COORDINATOR='10.0.0.1:7100'") && script.contains("flotilla worker"));
        // Identity and the advertised address come from the metadata, never 0.0.0.0.
        assert!(script.contains("--imds-endpoint ec2 --data-addr 0.0.0.0:7200"), "{script}");
        assert!(script.contains("export AWS_REGION="), "{script}");
        // S3 takes the instance role's credentials (flotilla_store::credentials).
        assert!(script.contains("export FLOTILLA_INSTANCE_ROLE=1\n"), "{script}");
        assert!(!script.contains("FLOTILLA_TLS"), "{script}");
    }

    #[test]
    fn user_data_with_tls_writes_the_worker_certificate_and_runs_the_script() {
        let tls = WorkerTls {
            ca_pem: "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".into(),
            cert_pem: "-----BEGIN CERTIFICATE-----\nW\n-----END CERTIFICATE-----".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nK\n-----END PRIVATE KEY-----\n".into(),
        };
        let script = worker_user_data("10.0.0.1:7100", "tok", Some(&tls));
        assert!(script.contains("FLOTILLA_TLS_KEY=/etc/flotilla/tls/worker-key.pem"), "{script}");
        // The file-writing part of the script, run by bash into a temporary folder, writes the
        // three files exactly (the heredocs are quoted: nothing in a PEM is expanded).
        let dir = std::env::temp_dir().join(format!("flotilla-user-data-{}", std::process::id()));
        let files_part: String = script
            .lines()
            .filter(|l| !l.starts_with("export ") && !l.starts_with("token=") && !l.starts_with("exec "))
            .filter(|l| !l.starts_with("http") && !l.starts_with("mkdir"))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("/etc/flotilla/tls", &dir.display().to_string());
        std::fs::create_dir_all(&dir).expect("temp dir");
        let status = std::process::Command::new("bash").arg("-c").arg(&files_part).status().expect("bash");
        assert!(status.success(), "{files_part}");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect(f);
        assert_eq!(read("ca.pem").trim(), tls.ca_pem.trim());
        assert_eq!(read("worker.pem").trim(), tls.cert_pem.trim());
        assert_eq!(read("worker-key.pem").trim(), tls.key_pem.trim());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
