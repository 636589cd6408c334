//! `flotilla certs`: the cluster CA and the certificates it signs (rcgen, ECDSA P-256).
//!
//! ```text
//!   certs init        --dir D            D/ca.pem, D/ca-key.pem (0600)
//!   certs coordinator --dir D --name N --host H...   D/N.pem, D/N-key.pem  (server + client)
//!   certs worker      --dir D [--name worker]        D/worker.pem, ...     (client)
//! ```
//!
//! Roles are SAN DNS names (`flotilla_proto::tls`): a coordinator certificate names its hosts
//! and `coordinator.flotilla.internal`, a worker certificate `worker.flotilla.internal`. The CA
//! key signs later certificates without the CA certificate being parsed: its issuer name and
//! key usages are fixed ([`ca_params`]), so they are rebuilt from the key alone.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

pub const CA_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// A certificate is valid this long by default.
pub const VALID_DAYS_DEFAULT: u32 = 365;
/// ... and at most this long.
pub const VALID_DAYS_MAX: u32 = 3650;
/// Hosts one coordinator certificate names at most.
const HOSTS_MAX: usize = 32;

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create the cluster CA in --dir (refuses to overwrite one).
    Init(InitArgs),
    /// A coordinator's certificate: it serves TLS on --host(s) and proves itself to its peers.
    Coordinator(IssueArgs),
    /// A worker's certificate (the same one may serve every worker of the cluster).
    Worker(IssueArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Folder for the CA (created; the key is written with mode 0600).
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value_t = VALID_DAYS_MAX)]
    pub days: u32,
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The CA's folder; the certificate and key are written there too.
    #[arg(long)]
    pub dir: PathBuf,
    /// File name stem: <name>.pem and <name>-key.pem (default: the role).
    #[arg(long)]
    pub name: Option<String>,
    /// IP address or DNS name clients and peers dial (coordinators; repeat for each).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    #[arg(long, default_value_t = VALID_DAYS_DEFAULT)]
    pub days: u32,
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init(args) => {
            init(&args.dir, args.days)?;
            println!("cluster CA: {}", args.dir.join(CA_FILE).display());
        }
        CertsCommand::Coordinator(args) => {
            if args.hosts.is_empty() {
                bail!("--host is required: the IP address or name clients and peers dial (repeat for each)");
            }
            let name = args.name.as_deref().unwrap_or("coordinator");
            let (cert, _) = issue(&args.dir, Role::Coordinator, name, &args.hosts, args.days)?;
            println!("coordinator certificate: {}", cert.display());
        }
        CertsCommand::Worker(args) => {
            let name = args.name.as_deref().unwrap_or("worker");
            let (cert, _) = issue(&args.dir, Role::Worker, name, &args.hosts, args.days)?;
            println!("worker certificate: {}", cert.display());
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Worker,
}

/// The CA's fixed parameters: everything of it that an issued certificate refers to.
fn ca_params(days: u32) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::new()).context("CA parameters")?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, "flotilla cluster CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days)?;
    Ok(params)
}

fn validity(params: &mut CertificateParams, days: u32) -> anyhow::Result<()> {
    if days == 0 || days > VALID_DAYS_MAX {
        bail!("--days is {days}; 1 to {VALID_DAYS_MAX}");
    }
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).context("the clock is before 1970")?;
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - std::time::Duration::from_secs(3600);
    params.not_after = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
    Ok(())
}

/// Creates the CA in `dir`; refuses to replace an existing one (certificates it signed would
/// stop verifying).
pub fn init(dir: &Path, days: u32) -> anyhow::Result<()> {
    if dir.join(CA_KEY_FILE).exists() {
        bail!("{} already holds a CA; remove it first to start over", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = ca_params(days)?.self_signed(&key).context("signing the CA certificate")?;
    write(&dir.join(CA_KEY_FILE), &key.serialize_pem(), true)?;
    write(&dir.join(CA_FILE), &cert.pem(), false)
}

/// Issues a certificate of `role` signed by the CA in `dir`: `(certificate, key)` paths.
pub fn issue(dir: &Path, role: Role, name: &str, hosts: &[String], days: u32) -> anyhow::Result<(PathBuf, PathBuf)> {
    let valid_name = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid_name {
        bail!("--name `{name}`: 1 to 64 characters of a-z, A-Z, 0-9, `-`, `_`");
    }
    if hosts.len() > HOSTS_MAX {
        bail!("{} hosts; at most {HOSTS_MAX}", hosts.len());
    }
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).with_context(|| {
        format!("cannot read the CA key {} (run `flotilla certs init` first)", ca_key_path.display())
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).with_context(|| format!("{} is not a key", ca_key_path.display()))?;
    let issuer = Issuer::new(ca_params(VALID_DAYS_MAX)?, ca_key);
    let role_name = match role {
        Role::Coordinator => flotilla_proto::tls::COORDINATOR_NAME,
        Role::Worker => flotilla_proto::tls::WORKER_NAME,
    };
    let mut names: Vec<String> = hosts.to_vec();
    names.push(role_name.to_string());
    let mut params = CertificateParams::new(names).with_context(|| format!("hosts {hosts:?}"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Coordinator => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Role::Worker => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    validity(&mut params, days)?;
    let key = KeyPair::generate().context("generating a key")?;
    let cert = params.signed_by(&key, &issuer).context("signing the certificate")?;
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}

/// Writes `text` to `path` through a temporary file (0600 for keys), replacing it.
fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&temp)
        .with_context(|| format!("cannot write {}", temp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temp.display()))?;
    std::fs::rename(&temp, path).with_context(|| format!("cannot write {}", path.display()))
}
