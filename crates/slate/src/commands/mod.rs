//! One module per verb.

pub mod bake;
pub mod build;
pub mod check;
pub mod images;
pub mod provenance;
pub mod publish;
pub mod run;
pub mod runs;
pub mod verify;

use crate::error::CliError;
use slate_config::Project;

/// A new run id: UTC time, then a short random part (ids sort by time).
pub fn new_run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let s = secs.rem_euclid(86400);
    let salt = (now.subsec_nanos() ^ std::process::id().rotate_left(16)) & 0xffff;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{salt:04x}",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// An unknown target or image name, with the closest known one as a hint.
pub fn unknown(kind: &str, name: &str, known: Vec<&str>) -> CliError {
    let mut e = CliError::usage(format!("no {kind} named `{name}`"));
    if let Some(best) = slate_config::diag::did_you_mean(name, known.iter().copied()) {
        e = e.hint(format!("did you mean `{best}`?"));
    } else if !known.is_empty() {
        e = e.hint(format!("known {kind}s: {}", known.join(", ")));
    }
    e
}

pub fn runs_dir(p: &Project) -> std::path::PathBuf {
    p.dir.join(".slate/runs")
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20417), (2025, 11, 25));
        assert_eq!(super::civil_from_days(11016), (2000, 2, 29));
    }
}
