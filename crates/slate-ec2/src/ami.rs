//! `slate bake --export ami`: an image's disk registered as an AMI. The
//! raw disk goes into a new EBS snapshot through the EBS direct API (only
//! its non-zero 512 KiB blocks, each with its sha256), the snapshot is
//! registered as an AMI, and both are tagged with the image's digest: an
//! export of a recipe that already has an AMI finds it and uploads
//! nothing.

use crate::api::{ApiError, Client};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

/// The tag naming the image digest an AMI or snapshot holds.
pub const TAG_DIGEST: &str = "slate:digest";
/// The tag naming the image (for people; the digest decides).
pub const TAG_IMAGE: &str = "slate:image";

/// The EBS direct API's block size.
const BLOCK: usize = 512 * 1024;

/// What an export did.
#[derive(Debug)]
pub struct Exported {
    pub ami: String,
    pub snapshot: Option<String>,
    /// Blocks and bytes sent (0 when the AMI was already there).
    pub blocks: u64,
    pub bytes: u64,
    /// The AMI was already registered for this digest.
    pub existing: bool,
}

/// The AMI registered for `digest`, if there is one (owned by these
/// credentials, not deregistered).
pub fn find(client: &Client, digest: &str) -> Result<Option<String>, ApiError> {
    let node = client.call(
        "DescribeImages",
        &[
            ("Owner.1".into(), "self".into()),
            ("Filter.1.Name".into(), format!("tag:{TAG_DIGEST}")),
            ("Filter.1.Value.1".into(), digest.into()),
        ],
    )?;
    let found = node
        .items("imagesSet")
        .filter(|i| {
            !matches!(
                i.text_at(&["imageState"]),
                Some("deregistered" | "failed" | "error")
            )
        })
        .find_map(|i| i.text_at(&["imageId"]).map(str::to_string));
    Ok(found)
}

/// Registers the raw disk `disk` (the image `image` with digest `digest`)
/// as the AMI `name`, unless one is registered for `digest` already.
/// `progress` is told `(bytes done, bytes in all)` as blocks go.
pub fn export(
    client: &Client,
    disk: &Path,
    image: &str,
    name: &str,
    digest: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Exported, String> {
    if let Some(ami) = find(client, digest).map_err(|e| e.to_string())? {
        return Ok(Exported {
            ami,
            snapshot: None,
            blocks: 0,
            bytes: 0,
            existing: true,
        });
    }
    let size = fs_err::metadata(disk).map_err(|e| e.to_string())?.len();
    let gib = size.div_ceil(1 << 30).max(1);
    let tags = serde_json::json!([
        {"Key": TAG_DIGEST, "Value": digest},
        {"Key": TAG_IMAGE, "Value": image},
    ]);
    let started = client
        .ebs(
            "StartSnapshot",
            "POST",
            "/snapshots",
            &[("content-type", "application/json")],
            serde_json::json!({
                "VolumeSize": gib,
                "Description": format!("slate image {image} {digest}"),
                "Tags": tags,
                "ClientToken": format!("slate-{}", &digest[digest.len().saturating_sub(32)..]),
                "Timeout": 60,
            })
            .to_string()
            .as_bytes(),
        )
        .map_err(|e| e.to_string())?;
    let snapshot = started
        .get("SnapshotId")
        .and_then(|v| v.as_str())
        .ok_or("StartSnapshot: no SnapshotId in the answer")?
        .to_string();
    let (blocks, bytes) = put_blocks(client, &snapshot, disk, size, progress)?;
    client
        .ebs(
            "CompleteSnapshot",
            "POST",
            &format!("/snapshots/completion/{snapshot}"),
            &[("x-amz-ChangedBlocksCount", &blocks.to_string())],
            b"",
        )
        .map_err(|e| e.to_string())?;
    wait_completed(client, &snapshot)?;
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        other => other,
    };
    let p: Vec<(String, String)> = [
        ("Name", name),
        ("Description", &format!("slate image {image}")),
        ("Architecture", arch),
        ("VirtualizationType", "hvm"),
        ("EnaSupport", "true"),
        ("RootDeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.Ebs.SnapshotId", &snapshot),
        ("BlockDeviceMapping.1.Ebs.VolumeType", "gp3"),
        ("BlockDeviceMapping.1.Ebs.DeleteOnTermination", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let node = client
        .call("RegisterImage", &p)
        .map_err(|e| e.to_string())?;
    let ami = node
        .text_at(&["imageId"])
        .filter(|a| !a.is_empty())
        .ok_or("RegisterImage: no imageId in the answer")?
        .to_string();
    client
        .call(
            "CreateTags",
            &[
                ("ResourceId.1".into(), ami.clone()),
                ("ResourceId.2".into(), snapshot.clone()),
                ("Tag.1.Key".into(), TAG_DIGEST.into()),
                ("Tag.1.Value".into(), digest.into()),
                ("Tag.2.Key".into(), TAG_IMAGE.into()),
                ("Tag.2.Value".into(), image.into()),
            ],
        )
        .map_err(|e| e.to_string())?;
    Ok(Exported {
        ami,
        snapshot: Some(snapshot),
        blocks,
        bytes,
        existing: false,
    })
}

/// Sends the disk's non-zero blocks, four at a time: `(blocks, bytes)`.
fn put_blocks(
    client: &Client,
    snapshot: &str,
    disk: &Path,
    size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(u64, u64), String> {
    let mut f = fs_err::File::open(disk).map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(8);
    let rx = std::sync::Mutex::new(rx);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<u64, String>>();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let (rx, done_tx) = (&rx, done_tx.clone());
            scope.spawn(move || loop {
                let next = rx.lock().unwrap().recv();
                let Ok((index, data)) = next else { return };
                let sum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&data));
                let len = data.len().to_string();
                let sent = client
                    .ebs(
                        "PutSnapshotBlock",
                        "PUT",
                        &format!("/snapshots/{snapshot}/blocks/{index}"),
                        &[
                            ("content-type", "application/octet-stream"),
                            ("x-amz-Data-Length", &len),
                            ("x-amz-Checksum", &sum),
                            ("x-amz-Checksum-Algorithm", "SHA256"),
                        ],
                        &data,
                    )
                    .map(|_| data.len() as u64)
                    .map_err(|e| format!("block {index}: {e}"));
                let failed = sent.is_err();
                let _ = done_tx.send(sent);
                if failed {
                    return;
                }
            });
        }
        drop(done_tx);
        let mut queued = 0u64;
        let mut read_err = None;
        let mut index = 0u64;
        let mut done = 0u64;
        let mut first_err = None;
        loop {
            let mut block = vec![0u8; BLOCK];
            let n = match read_full(&mut f, &mut block) {
                Ok(n) => n,
                Err(e) => {
                    read_err = Some(format!("cannot read `{}`: {e}", disk.display()));
                    break;
                }
            };
            if n == 0 {
                break;
            }
            // The last block is padded with zeros to the block size.
            if block.iter().any(|&b| b != 0) {
                if tx.send((index, block)).is_err() {
                    break;
                }
                queued += 1;
            }
            // Answers so far, so progress shows and a failure stops early.
            while let Ok(r) = done_rx.try_recv() {
                match r {
                    Ok(b) => done += b,
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if first_err.is_some() {
                break;
            }
            progress(index * BLOCK as u64 + n as u64, size);
            index += 1;
        }
        drop(tx);
        for r in done_rx {
            match r {
                Ok(b) => done += b,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = read_err.or(first_err) {
            return Err(e);
        }
        Ok((queued, done))
    })
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Waits (up to 30 minutes) for the snapshot to be completed.
fn wait_completed(client: &Client, snapshot: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let node = client
            .call(
                "DescribeSnapshots",
                &[("SnapshotId.1".into(), snapshot.into())],
            )
            .map_err(|e| e.to_string())?;
        let status = node
            .items("snapshotSet")
            .next()
            .and_then(|s| s.text_at(&["status"]))
            .unwrap_or("unknown")
            .to_string();
        match status.as_str() {
            "completed" => return Ok(()),
            "error" => return Err(format!("snapshot {snapshot} failed")),
            _ if Instant::now() > deadline => {
                return Err(format!(
                    "snapshot {snapshot} is still {status} after 30 minutes"
                ))
            }
            _ => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}
