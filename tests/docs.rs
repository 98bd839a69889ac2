//! The documentation's examples are checked by meshd's own loaders, so they cannot drift.

use meshd::config::{Config, ConfigArgs, ConfigFile};
use meshd::keys::PrivateKey;
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
