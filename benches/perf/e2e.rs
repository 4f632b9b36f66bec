//! Section `e2e`: see main.rs.

use crate::common::Bench;
use crate::report::Report;

pub async fn run(_bench: &Bench, _report: &mut Report) -> anyhow::Result<()> {
    anyhow::bail!("not written yet")
}
