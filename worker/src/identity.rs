//! Who this worker is when it registers: its instance id, type and zone (from the instance
//! metadata service when there is one: EC2's, or the local provider's, which speak the same
//! IMDSv2), its GPU count, and the one address the other ranks of a gang dial for the data
//! port.
//!
//! Owns: the rule for the advertised data address ([`advertised_addr`], pure), reading the
//! metadata ([`from_metadata`]) and counting GPUs ([`gpu_count`]).
//! Must not touch: registration and heartbeats (the agent), the data port itself (the ring).
//!
//! ```text
//!   --advertise-addr IP[:PORT]     what peers dial (PORT: the bound port)
//!   else bound IP, when specific   --data-addr 10.0.0.5:7200, 127.0.0.1:0 (local cluster)
//!   else metadata local-ipv4       --data-addr 0.0.0.0:7200 on EC2
//!   else refused                   0.0.0.0 is never advertised: peers would dial themselves
//! ```

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::imds::{ImdsClient, ImdsError};

/// How long `nvidia-smi -L` may take before the GPUs count as 0.
const GPU_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between tries of an endpoint that does not answer yet.
const METADATA_RETRY: Duration = Duration::from_millis(100);
/// Longest metadata value kept (ids, types, zones are short; anything longer is not theirs).
const METADATA_VALUE_LEN_MAX: usize = 255;

/// What a worker registers as (the rest of its capabilities, CPUs and memory, are read by the
/// agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    pub instance_id: String,
    /// The cloud's instance type (`g5.xlarge`), or `local`.
    pub instance_type: String,
    /// The availability zone (`us-east-1a`), or `local`.
    pub zone: String,
    pub gpus: u32,
    /// What the other ranks of a gang dial: never an unspecified address.
    pub data_addr: SocketAddr,
}

/// What the instance metadata says about this machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub instance_id: Option<String>,
    pub instance_type: Option<String>,
    pub zone: Option<String>,
    pub local_ipv4: Option<IpAddr>,
}

/// Reads the identity paths of the metadata service at `endpoint` (IMDSv2: one token, then
/// `instance-id`, `instance-type`, `placement/availability-zone`, `local-ipv4`). A path the
/// service does not serve stays `None`; an unreachable service is an error.
pub async fn from_metadata(endpoint: &str) -> Result<Metadata, ImdsError> {
    let mut client = ImdsClient::new(endpoint);
    let instance_id = value(&mut client, "instance-id").await?;
    let instance_type = value(&mut client, "instance-type").await?;
    let zone = value(&mut client, "placement/availability-zone").await?;
    let local_ipv4 = value(&mut client, "local-ipv4").await?.and_then(|ip| ip.parse().ok());
    Ok(Metadata { instance_id, instance_type, zone, local_ipv4 })
}

/// [`from_metadata`], retried every [`METADATA_RETRY`] for up to `deadline` while the
/// endpoint does not answer (a local endpoint starts beside its worker; EC2's is up at boot).
pub async fn from_metadata_within(endpoint: &str, deadline: Duration) -> Result<Metadata, ImdsError> {
    let started = tokio::time::Instant::now();
    loop {
        match from_metadata(endpoint).await {
            Err(ImdsError::Unreachable { .. }) if started.elapsed() < deadline => {
                tokio::time::sleep(METADATA_RETRY).await;
            }
            other => return other,
        }
    }
}

/// One metadata value, trimmed; `None` when absent, empty, too long or not plain text.
async fn value(client: &mut ImdsClient, path: &str) -> Result<Option<String>, ImdsError> {
    let text = client.get(&format!("/latest/meta-data/{path}")).await?;
    Ok(text
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty() && t.len() <= METADATA_VALUE_LEN_MAX && !t.chars().any(char::is_control)))
}

/// Why no address could be advertised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("--advertise-addr `{given}` is not IP or IP:PORT (e.g. 10.0.0.5 or 10.0.0.5:7200)")]
    Unparsable { given: String },
    #[error(
        "--advertise-addr {0} is not an address peers can dial (0.0.0.0 and :: mean every interface); give this \
         machine's address on the network the workers share"
    )]
    Unspecified(IpAddr),
    #[error(
        "--data-addr {0} listens on every interface, and no address for peers is known: pass --advertise-addr IP \
         (this machine's address on the workers' network), or run with an instance metadata endpoint that gives \
         local-ipv4 (--imds-endpoint)"
    )]
    Unknown(SocketAddr),
}

/// The address the other ranks dial to reach this worker's data port, bound at `bound`.
/// Pure; the rule is in the module docs.
pub fn advertised_addr(
    bound: SocketAddr,
    advertise: Option<&str>,
    metadata_ipv4: Option<IpAddr>,
) -> Result<SocketAddr, AddressError> {
    if let Some(given) = advertise.map(str::trim).filter(|g| !g.is_empty()) {
        let addr = match given.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => match given.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, bound.port()),
                Err(_) => return Err(AddressError::Unparsable { given: given.to_string() }),
            },
        };
        if addr.ip().is_unspecified() {
            return Err(AddressError::Unspecified(addr.ip()));
        }
        return Ok(addr);
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    match metadata_ipv4.filter(|ip| !ip.is_unspecified()) {
        Some(ip) => Ok(SocketAddr::new(ip, bound.port())),
        None => Err(AddressError::Unknown(bound)),
    }
}

/// GPUs in `nvidia-smi -L` output: one `GPU <n>: ...` line each.
pub fn count_gpu_lines(listing: &str) -> u32 {
    listing.lines().filter(|l| l.trim_start().starts_with("GPU ")).count() as u32
}

/// This machine's NVIDIA GPUs, as `nvidia-smi -L` lists them; 0 where it is not installed,
/// fails or does not answer within [`GPU_PROBE_TIMEOUT`].
pub async fn gpu_count() -> u32 {
    let mut command = tokio::process::Command::new("nvidia-smi");
    command.arg("-L").stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(GPU_PROBE_TIMEOUT, command.output()).await {
        Ok(Ok(out)) if out.status.success() => count_gpu_lines(&String::from_utf8_lossy(&out.stdout)),
        Ok(Ok(_)) | Ok(Err(_)) => 0,
        Err(_) => {
            eprintln!("nvidia-smi -L did not answer within {GPU_PROBE_TIMEOUT:?}; reporting 0 GPUs");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn the_advertised_address_is_never_unspecified() {
        let any = addr("0.0.0.0:7200");
        let ip = |t: &str| t.parse::<IpAddr>().expect("ip");
        assert_eq!(advertised_addr(any, Some("10.0.0.5"), None), Ok(addr("10.0.0.5:7200")), "bound port kept");
        assert_eq!(advertised_addr(any, Some("10.0.0.5:9000"), None), Ok(addr("10.0.0.5:9000")));
        assert_eq!(advertised_addr(any, Some("10.0.0.5"), Some(ip("10.0.0.9"))), Ok(addr("10.0.0.5:7200")));
        assert_eq!(advertised_addr(any, None, Some(ip("10.0.0.9"))), Ok(addr("10.0.0.9:7200")), "metadata");
        assert_eq!(advertised_addr(addr("127.0.0.1:4100"), None, Some(ip("10.0.0.9"))), Ok(addr("127.0.0.1:4100")));
        assert_eq!(advertised_addr(any, None, None), Err(AddressError::Unknown(any)));
        assert_eq!(advertised_addr(any, None, Some(ip("0.0.0.0"))), Err(AddressError::Unknown(any)));
        assert_eq!(advertised_addr(any, Some("0.0.0.0"), None), Err(AddressError::Unspecified(ip("0.0.0.0"))));
        assert_eq!(advertised_addr(any, Some("[::]:1"), None), Err(AddressError::Unspecified(ip("::"))));
        let bad = advertised_addr(any, Some("worker-1"), None).expect_err("a name");
        assert!(bad.to_string().contains("`worker-1` is not IP or IP:PORT"), "{bad}");
        assert!(AddressError::Unknown(any).to_string().contains("pass --advertise-addr IP"));
    }

    #[test]
    fn gpus_are_counted_from_nvidia_smi_lines() {
        let listing = "GPU 0: NVIDIA A10G (UUID: GPU-1)\nGPU 1: NVIDIA A10G (UUID: GPU-2)\n";
        assert_eq!(count_gpu_lines(listing), 2);
        assert_eq!(count_gpu_lines("No devices were found\n"), 0);
        assert_eq!(count_gpu_lines(""), 0);
    }
}
