//! The documentation's examples are checked by meshd's own loaders, its configuration reference
//! against the config types, and the homelab guide's commands are run, so none can drift.

use meshd::config::{parse_peer_spec, Config, ConfigArgs, ConfigFile, PeerFile};
use meshd::keys::PrivateKey;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The fenced ```toml blocks of a markdown file.
fn toml_blocks(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn configuration_reference_example_loads() {
    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let blocks = toml_blocks(&doc);
    assert!(!blocks.is_empty(), "no toml example in {}", doc.display());
    for block in blocks {
        let mut file = ConfigFile::parse(&doc, &block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        // The example names /etc/meshd/private.key; check the rest against a real key file.
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("private.key");
        std::fs::write(&key, PrivateKey::generate().to_base64().as_str()).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        assert_eq!(
            file.private_key_file.as_deref(),
            Some(Path::new("/etc/meshd/private.key"))
        );
        file.private_key_file = Some(key);
        let config = Config::from_parts(file, &ConfigArgs::default()).unwrap();
        assert_eq!(config.cluster, "m1");
        assert_eq!(config.peers[0].allowed_cidrs.len(), 3);
    }
}

/// The exports-file example in docs/dns.md is read by meshd's own parser.
#[test]
fn dns_doc_exports_example_parses() {
    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/dns.md");
    let blocks = toml_blocks(&doc);
    assert_eq!(
        blocks.len(),
        1,
        "one toml example expected in {}",
        doc.display()
    );
    let catalog = meshd::discovery::exports::parse(&doc, &blocks[0], "m2", 1)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(catalog.services.len(), 2);
}

/// A markdown table's cells, split on `|` but not on `\|`.
fn table_cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = vec![String::new()];
    let mut escaped = false;
    for c in inner.chars() {
        match c {
            '|' if !escaped => cells.push(String::new()),
            _ => cells.last_mut().unwrap().push(c),
        }
        escaped = c == '\\';
    }
    cells.iter().map(|c| c.trim().to_string()).collect()
}

/// The rows (cells) of the markdown table whose header's first cell is `first_header`.
fn table_rows(text: &str, first_header: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines();
    let found = lines
        .by_ref()
        .any(|l| l.starts_with('|') && table_cells(l)[0] == first_header);
    assert!(found, "no table headed `{first_header}`");
    lines
        .skip(1) // the |---| line
        .take_while(|l| l.starts_with('|'))
        .map(table_cells)
        .collect()
}

/// The first word of each `code span` in a cell.
fn code_words(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|span| span.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Records the field names a derived `Deserialize` asks for, without any input.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("only structs have field names"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn field_names<T: serde::de::DeserializeOwned>() -> BTreeSet<String> {
    let mut fields: &'static [&'static str] = &[];
    assert!(T::deserialize(FieldNames(&mut fields)).is_err());
    assert!(!fields.is_empty(), "no fields recorded");
    fields.iter().map(|f| f.to_string()).collect()
}

/// meshd's flags, as clap knows them.
#[derive(clap::Parser)]
struct MeshdFlags {
    #[command(flatten)]
    config: ConfigArgs,
}

#[test]
fn configuration_reference_lists_every_field_and_flag_and_nothing_else() {
    use clap::CommandFactory;
    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let text = std::fs::read_to_string(&doc).unwrap();

    // The file's fields: one row each, and a row for nothing else.
    let rows = table_rows(&text, "field");
    let documented: BTreeMap<String, &Vec<String>> = rows
        .iter()
        .map(|row| {
            let field = code_words(&row[0])
                .pop()
                .expect("a `field` in the first cell");
            let field = field
                .trim_start_matches("[[")
                .trim_end_matches("]]")
                .to_string();
            (field, row)
        })
        .collect();
    let fields = field_names::<ConfigFile>();
    let listed: BTreeSet<String> = documented.keys().cloned().collect();
    assert_eq!(
        listed, fields,
        "docs/configuration.md's field table must list exactly ConfigFile's fields"
    );

    // Each flag and variable is in its field's row; the table names no other.
    let command = MeshdFlags::command();
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let flag = format!("--{long}");
        let env = arg
            .get_env()
            .map(|e| e.to_string_lossy().to_string())
            .expect("every meshd flag has an environment variable");
        let id = arg.get_id().as_str();
        if id == "config" {
            assert!(text.contains("--config"), "--config is not mentioned");
            continue;
        }
        let row = documented
            .get(id)
            .unwrap_or_else(|| panic!("{flag} ({id}) has no row in the field table"));
        let words = code_words(&row[1]);
        assert!(words.contains(&flag), "row `{id}` lacks {flag}: {}", row[1]);
        assert!(words.contains(&env), "row `{id}` lacks {env}: {}", row[1]);
        flags.insert(flag);
        envs.insert(env);
    }
    for row in &rows {
        for word in code_words(&row[1]) {
            assert!(
                flags.contains(&word) || envs.contains(&word),
                "the field table names `{word}`, which meshd does not have"
            );
        }
    }

    // The peer fields and their --peer keys.
    let rows = table_rows(&text, "peer field");
    let peer_fields: BTreeSet<String> = rows
        .iter()
        .map(|row| {
            code_words(&row[0])
                .pop()
                .expect("a `field` in the first cell")
        })
        .collect();
    assert_eq!(
        peer_fields,
        field_names::<PeerFile>(),
        "docs/configuration.md's peer table must list exactly PeerFile's fields"
    );
    let unknown = parse_peer_spec("colour=blue").unwrap_err().to_string();
    let keys: BTreeSet<String> = unknown
        .rsplit_once("keys are ")
        .expect("the error lists the --peer keys")
        .1
        .split(", ")
        .map(str::to_string)
        .collect();
    let documented_keys: BTreeSet<String> = rows
        .iter()
        .map(|row| code_words(&row[1]).pop().expect("a `--peer` key"))
        .collect();
    assert_eq!(
        documented_keys, keys,
        "the peer table's `--peer` keys must be exactly those parse_peer_spec accepts"
    );
}

/// Marks a ```sh block of a guide that tests run (an HTML comment: invisible when rendered).
const RUNS_MARK: &str = "<!-- tests/docs.rs runs this block -->";

/// The ```sh blocks right after a [`RUNS_MARK`] line.
fn runnable_blocks(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() != RUNS_MARK {
            continue;
        }
        assert_eq!(
            lines.next().map(str::trim),
            Some("```sh"),
            "{}: {RUNS_MARK} must be followed by a ```sh block",
            path.display()
        );
        let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        blocks.push(block.join("\n") + "\n");
    }
    blocks
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The private key in a Secret manifest written by `meshctl secret`.
fn secret_key(path: &Path) -> PrivateKey {
    use base64::Engine;
    let text = std::fs::read_to_string(path).unwrap();
    let data = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("private.key: "))
        .unwrap_or_else(|| panic!("{}: no private.key", path.display()));
    let file = base64::engine::general_purpose::STANDARD
        .decode(data)
        .unwrap();
    PrivateKey::from_base64("the Secret's key", &String::from_utf8(file).unwrap()).unwrap()
}

/// An overlay's meshd.toml as a YAML parser (PyYAML) reads the ConfigMap, loaded by meshd's own
/// loader with `key` in place of the mounted Secret.
fn load_overlay_with(path: &Path, key: &PrivateKey, scratch: &Path) -> Config {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, yaml; sys.stdout.write(yaml.safe_load(open(sys.argv[1]))['data']['meshd.toml'])",
        ])
        .arg(path)
        .output()
        .expect("python3 with PyYAML (apt-get install python3-yaml; scripts/deps.sh does)");
    assert!(
        out.status.success(),
        "{} is not a ConfigMap YAML can read: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8(out.stdout).unwrap();
    let mut file = ConfigFile::parse(path, &toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let key_path = scratch.join("mounted.key");
    std::fs::write(&key_path, key.to_base64().as_str()).unwrap();
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    file.private_key_file = Some(key_path);
    Config::from_parts(file, &ConfigArgs::default()).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

/// Every command of docs/homelab.md that runs on one machine (keys, Secrets, peer stanzas, the
/// overlays edited and checked) runs here, in a scratch copy of deploy/, with this build's meshctl;
/// the overlays it leaves are then read by a YAML parser and meshd's own loader.
#[test]
fn homelab_guide_commands_run_and_join_the_overlays() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let doc = root.join("docs/homelab.md");
    let blocks = runnable_blocks(&doc);
    assert!(
        blocks.len() >= 4,
        "{}: runnable blocks went missing",
        doc.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_dir(&root.join("deploy"), &d.join("deploy"));
    let bin = Path::new(env!("CARGO_BIN_EXE_meshctl")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = format!("set -euo pipefail\n{}", blocks.concat());
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(d)
        .env("PATH", path)
        .output()
        .unwrap();
    let shown = format!(
        "{script}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown}");

    // The keys are gone; the Secrets (applied by hand in the guide) hold them, owner-only.
    assert!(
        !d.join("m1.key").exists() && !d.join("m2.key").exists(),
        "{shown}"
    );
    let mut keys = Vec::new();
    for cluster in ["m1", "m2"] {
        let secret = d.join(format!("{cluster}-secret.yaml"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&secret).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", secret.display());
        let key = secret_key(&secret);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !stdout.contains(key.to_base64().as_str()),
            "a private key was printed"
        );
        keys.push(key);
    }

    // Each overlay now holds the other cluster's stanza, and meshd accepts it.
    let m1 = load_overlay_with(&d.join("deploy/overlays/m1/meshd-config.yaml"), &keys[0], d);
    let m2 = load_overlay_with(&d.join("deploy/overlays/m2/meshd-config.yaml"), &keys[1], d);
    for (here, there, there_key) in [(&m1, &m2, &keys[1]), (&m2, &m1, &keys[0])] {
        assert_eq!(here.peers.len(), 1, "{}", here.cluster);
        let peer = &here.peers[0];
        assert_eq!(peer.name, there.cluster);
        assert_eq!(peer.public_key, there_key.public_key());
        let tunnel = there.tunnel_address.unwrap();
        let mut allowed = there.local_cidrs.clone();
        allowed.push(ipnet::IpNet::new(tunnel.addr(), 32).unwrap());
        assert_eq!(peer.allowed_cidrs, allowed);
        assert_eq!(peer.tunnel_address, Some(tunnel.addr()));
    }
    let m1_in_m2 = &m2.peers[0];
    assert_eq!(m1_in_m2.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
    assert_eq!(m1_in_m2.persistent_keepalive, Some(25));
    assert_eq!(m1.peers[0].endpoint, None, "M2 is behind NAT");

    // The stanza shown in the guide is what `meshctl stanza` writes, up to the key.
    let shown_stanza = toml_blocks(&doc)
        .into_iter()
        .find(|b| b.contains("[[peers]]"))
        .expect("the guide shows m1-peer.toml");
    let written = std::fs::read_to_string(d.join("m1-peer.toml")).unwrap();
    let without_key = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with("public_key"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(without_key(&shown_stanza), without_key(&written));
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces as hyphens.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings (outside code blocks).
fn anchors(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut in_code = false;
    let mut found = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            found.insert(anchor_of(line.trim_start_matches('#')));
        }
    }
    found
}

/// Every relative link of the README and docs/ names a file that exists, and every `#anchor` a
/// heading of it.
#[test]
fn links_between_the_docs_resolve() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let mut in_code = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if in_code {
                continue;
            }
            for (at, _) in line.match_indices("](") {
                let rest = &line[at + 2..];
                let Some(end) = rest.find(')') else { continue };
                let link = &rest[..end];
                if link.contains("://") || link.starts_with("mailto:") {
                    continue;
                }
                let (file, anchor) = link.split_once('#').unwrap_or((link, ""));
                let target = if file.is_empty() {
                    page.clone()
                } else {
                    page.parent().unwrap().join(file)
                };
                if !target.exists() {
                    broken.push(format!("{}: {link}: no such file", page.display()));
                } else if !anchor.is_empty()
                    && target.extension().is_some_and(|e| e == "md")
                    && !anchors(&target).contains(anchor)
                {
                    broken.push(format!("{}: {link}: no such heading", page.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The module graph in docs/architecture.md is the code's, and it has no cycle.
#[test]
fn module_graph_is_current_and_acyclic() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("python3")
        .arg(root.join("scripts/module-graph.py"))
        .arg("--check")
        .output()
        .expect("python3 runs scripts/module-graph.py (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
