//! `flotilla dashboard`: the address of the web dashboard, with the API token in the URL
//! fragment (the browser keeps it; it is never sent to the server in a URL). The dashboard is
//! served by every coordinator's `--metrics-addr` port; `up` sets one per local coordinator.

use anyhow::Context;
use serde_json::json;

use crate::cluster_file::{self, ClusterFile};
use crate::output::{OutputFormat, print_json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The dashboard's host:port (a coordinator's --metrics-addr); default: the local cluster's
    /// first coordinator, from its cluster file.
    #[arg(long, env = "FLOTILLA_DASHBOARD")]
    pub address: Option<String>,
    /// Open it in the desktop's browser (xdg-open) as well as printing it.
    #[arg(long)]
    pub open: bool,
}

pub fn run(args: Args, output: OutputFormat) -> anyhow::Result<()> {
    let home = cluster_file::home();
    let file = ClusterFile::load(&home)?;
    let address = match args.address.filter(|a| !a.is_empty()) {
        Some(address) => address,
        None => file
            .as_ref()
            .and_then(|f| f.coordinators.iter().find_map(|c| c.metrics_address.clone()))
            .with_context(|| {
                format!(
                    "no dashboard address: pass --address host:port (a coordinator's --metrics-addr) or \
                     start a local cluster with `flotilla up` (looked in {})",
                    home.join(cluster_file::CLUSTER_FILE).display()
                )
            })?,
    };
    let token = cluster_file::api_token(file.as_ref())?;
    let url = dashboard_url(&address, &token);
    match output {
        OutputFormat::Json => print_json(&json!({ "url": url, "address": address })),
        OutputFormat::Text => println!("{url}"),
    }
    if args.open {
        std::process::Command::new("xdg-open")
            .arg(&url)
            .status()
            .context("cannot run xdg-open; open the printed address in a browser")?;
    }
    Ok(())
}

/// `http://ADDRESS/#token=TOKEN` (pure); an address given as a URL keeps its scheme.
pub fn dashboard_url(address: &str, token: &str) -> String {
    let base =
        if address.contains("://") { address.trim_end_matches('/').to_string() } else { format!("http://{address}") };
    format!("{base}/#token={token}")
}

#[cfg(test)]
mod tests {
    use super::dashboard_url;

    #[test]
    fn the_token_travels_in_the_fragment() {
        assert_eq!(dashboard_url("127.0.0.1:9464", "abc"), "http://127.0.0.1:9464/#token=abc");
        assert_eq!(dashboard_url("https://dash.example/", "abc"), "https://dash.example/#token=abc");
    }
}
