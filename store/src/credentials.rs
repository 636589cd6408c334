//! Where an S3 client's credentials come from, decided before it makes any request.
//!
//! object_store's own chain ends at EC2's instance metadata (169.254.169.254) whenever the
//! environment names no keys: on a laptop or a build machine that is a request to an address
//! that does not answer (seconds of connect timeouts and retries, then a confusing error), and
//! it does not read the AWS CLI's profiles at all. So the choice is made here, in this order,
//! as the AWS SDKs make it:
//!
//! ```text
//!   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, web identity, container credentials,
//!   AWS_SKIP_SIGNATURE                         -> the client takes them from the environment
//!   AWS_PROFILE, or [default], with static keys in ~/.aws/credentials (or ~/.aws/config)
//!                                              -> those keys (and the profile's region)
//!   the instance role                          -> EC2's metadata endpoint, only where allowed:
//!       AWS_EC2_METADATA_DISABLED=true  never
//!       FLOTILLA_INSTANCE_ROLE=1 / 0    as it says (the EC2 boot scripts set 1)
//!       AWS_METADATA_ENDPOINT set       yes (that endpoint)
//!       otherwise                       only on EC2 hardware (/sys/class/dmi/id/sys_vendor)
//!   none of these                              -> NoCredentials, naming what to set; no request
//! ```
//!
//! [`choose`] is the pure rule; [`from_env`] reads the two profile files (bounded) and the
//! machine's vendor for it.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The variable that allows (1) or forbids (0) EC2's instance role where it is not detected.
pub const INSTANCE_ROLE_ENV: &str = "FLOTILLA_INSTANCE_ROLE";
/// A profile file larger than this is not read (a profile file is a few KiB).
pub const PROFILE_FILE_BYTES_MAX: u64 = 1 << 20;

/// Where the S3 client's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The environment names them (keys, a web identity, a container endpoint, or anonymous
    /// access); the client reads them itself.
    Environment,
    /// A profile's static keys, from the AWS CLI's files.
    Profile { name: String, key_id: String, secret: String, token: Option<String>, region: Option<String> },
    /// EC2's instance role, through the instance metadata endpoint.
    InstanceRole,
}

/// The AWS CLI's two profile files, as read (path and text), when they exist.
#[derive(Debug, Default)]
pub struct ProfileFiles {
    pub credentials: Option<(PathBuf, String)>,
    pub config: Option<(PathBuf, String)>,
}

/// The variables [`choose`] looks at (the rest of the environment is ignored).
pub fn relevant(name: &str) -> bool {
    name.starts_with("AWS_") || name == INSTANCE_ROLE_ENV || name == "HOME"
}

/// The credential source `vars` name, the profile files `files` give (read only when the
/// environment names no keys) and whether this machine is an EC2 instance (asked last).
/// Err: why no source applies, and what to set.
pub fn choose(
    vars: &BTreeMap<String, String>,
    files: impl FnOnce() -> ProfileFiles,
    on_ec2: impl FnOnce() -> bool,
) -> Result<Source, String> {
    let set = |name: &str| vars.get(name).is_some_and(|v| !v.trim().is_empty());
    let truthy = |name: &str| {
        vars.get(name).is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
    };
    if set("AWS_ACCESS_KEY_ID")
        || set("AWS_SECRET_ACCESS_KEY")
        || set("AWS_WEB_IDENTITY_TOKEN_FILE") && set("AWS_ROLE_ARN")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI") && set("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
        || truthy("AWS_SKIP_SIGNATURE")
    {
        return Ok(Source::Environment);
    }
    let named = vars.get("AWS_PROFILE").map(|p| p.trim()).filter(|p| !p.is_empty());
    let profile = named.unwrap_or("default");
    let files = files();
    let in_credentials = files.credentials.as_ref().and_then(|(_, text)| ini_section(text, &|s| s == profile));
    let config_section = |s: &str| s == profile || s == format!("profile {profile}");
    let in_config = files.config.as_ref().and_then(|(_, text)| ini_section(text, &config_section));
    let value = |name: &str| {
        [&in_credentials, &in_config]
            .into_iter()
            .flatten()
            .find_map(|section| section.get(name).filter(|v| !v.is_empty()).cloned())
    };
    if let (Some(key_id), Some(secret)) = (value("aws_access_key_id"), value("aws_secret_access_key")) {
        let region = in_config.as_ref().and_then(|c| c.get("region").filter(|r| !r.is_empty()).cloned());
        return Ok(Source::Profile {
            name: profile.to_string(),
            key_id,
            secret,
            token: value("aws_session_token"),
            region,
        });
    }
    if let Some(profile) = named {
        let read: Vec<String> =
            [&files.credentials, &files.config].into_iter().flatten().map(|(p, _)| p.display().to_string()).collect();
        let read =
            if read.is_empty() { "no profile file exists".to_string() } else { format!("read {}", read.join(" and ")) };
        return Err(format!(
            "AWS_PROFILE={profile} has no aws_access_key_id and aws_secret_access_key ({read}); SSO, \
             credential_process and role_arn profiles are not read: export the keys, e.g. \
             `eval \"$(aws configure export-credentials --profile {profile} --format env)\"`"
        ));
    }
    let instance_role = if truthy("AWS_EC2_METADATA_DISABLED") {
        false
    } else if set(INSTANCE_ROLE_ENV) {
        truthy(INSTANCE_ROLE_ENV)
    } else {
        set("AWS_METADATA_ENDPOINT") || on_ec2()
    };
    if instance_role {
        return Ok(Source::InstanceRole);
    }
    Err(format!(
        "none in the environment nor a [default] profile, and the instance role is off: it is used on EC2, \
         or with {INSTANCE_ROLE_ENV}=1"
    ))
}

/// The keys of the first section of `text` (INI, as the AWS CLI writes it) whose name `wanted`
/// accepts; None when there is none.
fn ini_section(text: &str, wanted: &dyn Fn(&str) -> bool) -> Option<BTreeMap<String, String>> {
    let mut found: Option<BTreeMap<String, String>> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if found.is_some() {
                break;
            }
            if wanted(name.trim()) {
                found = Some(BTreeMap::new());
            }
            continue;
        }
        if let (Some(section), Some((key, value))) = (found.as_mut(), line.split_once('=')) {
            section.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    found
}

/// [`choose`] for `vars` on this machine: the profile files at AWS_SHARED_CREDENTIALS_FILE and
/// AWS_CONFIG_FILE (default `$HOME/.aws/credentials` and `$HOME/.aws/config`; none without
/// HOME), and the machine's vendor.
pub fn from_env(vars: &BTreeMap<String, String>) -> Result<Source, String> {
    let path = |variable: &str, default: &str| {
        vars.get(variable)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .or_else(|| vars.get("HOME").filter(|h| !h.is_empty()).map(|home| PathBuf::from(home).join(default)))
    };
    let files = || ProfileFiles {
        credentials: path("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials").and_then(read_bounded),
        config: path("AWS_CONFIG_FILE", ".aws/config").and_then(read_bounded),
    };
    choose(vars, files, on_ec2)
}

/// The text of the file at `path`, when it exists and is at most [`PROFILE_FILE_BYTES_MAX`].
fn read_bounded(path: PathBuf) -> Option<(PathBuf, String)> {
    use std::io::Read;
    let file = std::fs::File::open(&path).ok()?;
    let mut text = String::new();
    file.take(PROFILE_FILE_BYTES_MAX + 1).read_to_string(&mut text).ok()?;
    (text.len() as u64 <= PROFILE_FILE_BYTES_MAX).then_some((path, text))
}

/// Whether this machine is an EC2 instance, from the firmware's vendor (Nitro) or the Xen
/// hypervisor's id (older types); local files only, no request.
fn on_ec2() -> bool {
    let read = |path: &str| std::fs::read_to_string(path).map(|t| t.trim().to_string()).unwrap_or_default();
    read("/sys/class/dmi/id/sys_vendor") == "Amazon EC2" || read("/sys/hypervisor/uuid").starts_with("ec2")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn files(credentials: Option<&str>, config: Option<&str>) -> impl FnOnce() -> ProfileFiles {
        let credentials = credentials.map(|t| (PathBuf::from("/home/u/.aws/credentials"), t.to_string()));
        let config = config.map(|t| (PathBuf::from("/home/u/.aws/config"), t.to_string()));
        move || ProfileFiles { credentials, config }
    }

    fn no_files() -> ProfileFiles {
        ProfileFiles::default()
    }

    #[test]
    fn keys_in_the_environment_win_and_nothing_else_is_read() {
        for env in [
            vars(&[("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")]),
            vars(&[("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"), ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r")]),
            vars(&[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/credentials/x")]),
            vars(&[("AWS_SKIP_SIGNATURE", "true")]),
        ] {
            let chosen = choose(&env, || panic!("no file read"), || panic!("no vendor read"));
            assert_eq!(chosen, Ok(Source::Environment), "{env:?}");
        }
    }

    #[test]
    fn a_profile_gives_its_keys_and_region() {
        let credentials = "# comment\n[other]\naws_access_key_id = X\n\n[dev]\naws_access_key_id = AKIA1\n\
                           aws_secret_access_key = s3cr3t\naws_session_token = tok\n[default]\naws_access_key_id = D\n\
                           aws_secret_access_key = DS\n";
        let config = "[default]\nregion = us-east-1\n[profile dev]\nregion = eu-west-1\n";
        let chosen = choose(&vars(&[("AWS_PROFILE", "dev")]), files(Some(credentials), Some(config)), || false);
        assert_eq!(
            chosen,
            Ok(Source::Profile {
                name: "dev".into(),
                key_id: "AKIA1".into(),
                secret: "s3cr3t".into(),
                token: Some("tok".into()),
                region: Some("eu-west-1".into()),
            })
        );
        // Without AWS_PROFILE: [default], from either file.
        let chosen = choose(&vars(&[]), files(Some(credentials), Some(config)), || false);
        assert!(
            matches!(&chosen, Ok(Source::Profile { key_id, region, .. }) if key_id == "D" && region.as_deref() == Some("us-east-1")),
            "{chosen:?}"
        );
        let in_config = "[profile dev]\naws_access_key_id = C\naws_secret_access_key = CS\n";
        let chosen = choose(&vars(&[("AWS_PROFILE", "dev")]), files(None, Some(in_config)), || false);
        assert!(
            matches!(&chosen, Ok(Source::Profile { key_id, token: None, region: None, .. }) if key_id == "C"),
            "{chosen:?}"
        );
    }

    #[test]
    fn a_named_profile_without_keys_says_how_to_export_them() {
        let config = "[profile sso]\nsso_session = corp\nregion = eu-west-1\n";
        let error = choose(&vars(&[("AWS_PROFILE", "sso")]), files(None, Some(config)), || panic!("no fallback"))
            .expect_err("no keys");
        assert!(error.contains("AWS_PROFILE=sso has no aws_access_key_id"), "{error}");
        assert!(error.contains("read /home/u/.aws/config"), "{error}");
        assert!(error.contains("aws configure export-credentials --profile sso"), "{error}");
        let error = choose(&vars(&[("AWS_PROFILE", "x")]), no_files, || true).expect_err("no keys");
        assert!(error.contains("no profile file exists"), "{error}");
    }

    #[test]
    fn the_instance_role_only_where_allowed() {
        // Off this machine's EC2 detection unless told.
        assert!(choose(&vars(&[]), no_files, || false).is_err());
        assert_eq!(choose(&vars(&[]), no_files, || true), Ok(Source::InstanceRole));
        assert_eq!(
            choose(&vars(&[(INSTANCE_ROLE_ENV, "1")]), no_files, || panic!("not asked")),
            Ok(Source::InstanceRole)
        );
        assert!(choose(&vars(&[(INSTANCE_ROLE_ENV, "0")]), no_files, || panic!("not asked")).is_err());
        assert_eq!(
            choose(&vars(&[("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")]), no_files, || panic!("not asked")),
            Ok(Source::InstanceRole)
        );
        // The standard switch wins over everything.
        for also in [(INSTANCE_ROLE_ENV, "1"), ("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")] {
            let env = vars(&[("AWS_EC2_METADATA_DISABLED", "true"), also]);
            assert!(choose(&env, no_files, || true).is_err(), "{env:?}");
        }
        let error = choose(&vars(&[]), no_files, || false).expect_err("off");
        assert!(error.contains("FLOTILLA_INSTANCE_ROLE=1"), "{error}");
    }

    #[test]
    fn profile_files_are_found_under_home_or_where_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join(".aws")).expect("mkdir");
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[default]\naws_access_key_id=H\naws_secret_access_key=HS\n",
        )
        .expect("write");
        let home = dir.path().display().to_string();
        let chosen = from_env(&vars(&[("HOME", &home)]));
        assert!(matches!(&chosen, Ok(Source::Profile { key_id, .. }) if key_id == "H"), "{chosen:?}");
        let named = dir.path().join("elsewhere");
        std::fs::write(&named, "[default]\naws_access_key_id=E\naws_secret_access_key=ES\n").expect("write");
        let env = vars(&[("HOME", &home), ("AWS_SHARED_CREDENTIALS_FILE", &named.display().to_string())]);
        assert!(matches!(&from_env(&env), Ok(Source::Profile { key_id, .. }) if key_id == "E"));
        // Too large a file is not read (its keys come first here).
        let mut large = b"[default]\naws_access_key_id=E\naws_secret_access_key=ES\n".to_vec();
        large.resize(PROFILE_FILE_BYTES_MAX as usize + 1, b'#');
        std::fs::write(&named, large).expect("write");
        let env = vars(&[("AWS_SHARED_CREDENTIALS_FILE", &named.display().to_string()), (INSTANCE_ROLE_ENV, "0")]);
        assert!(from_env(&env).is_err());
    }
}
