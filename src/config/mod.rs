//! Configuration files: the mesh topology (`topology/*.toml`) and one node's config.
//!
//! Both are TOML with a `version` field; unknown keys are refused. Parsing and `validate` do
//! no IO (the one IO step, reading the files, is `NodeConfig::load`), and every error names
//! the file and the key so a bad deploy is caught before anything starts.

mod node;
mod tables;
mod topology;

use std::path::{Path, PathBuf};

pub use node::{
    Database, HttpConfig, HttpFile, KAFKA_MAX_MESSAGE_MIB, KAFKA_RESERVED, KafkaFile, NodeConfig, NodeConfigFile,
    ReplicationConfig, Security, TlsFile,
};
pub use tables::{OwnerRange, OwnerRule, Strategy, TableConfig, UnknownColumns};
pub use topology::{KafkaClusters, LinkSpec, NodeSpec, Shape, Topology, Transport};

pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

pub(crate) fn invalid(file: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_owned(),
        key: key.into(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPOLOGY: &str = r#"
version = 1
mesh = "test"
shape = "all-to-all"
[[nodes]]
id = "a"
region = "ra"
address = "127.0.0.1:1"
[[nodes]]
id = "b"
region = "rb"
address = "127.0.0.1:2"
"#;

    #[test]
    fn parses_a_good_topology() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.shape, Shape::AllToAll);
    }

    #[test]
    fn refuses_bad_topologies_with_file_and_key() {
        let cases = [
            (TOPOLOGY.replace("mesh =", "mesh_name ="), "unknown field `mesh_name`"),
            (TOPOLOGY.replace("version = 1", "version = 2"), "version: is 2"),
            (TOPOLOGY.replace("\"b\"", "\"a\""), "duplicate node id `a`"),
            (TOPOLOGY.replace(":2\"", ":1\""), "duplicate address"),
            (TOPOLOGY.replace("127.0.0.1:2", "nowhere"), "is not host:port"),
            (
                TOPOLOGY.replace("all-to-all", "mesh-of-doom"),
                "unknown variant `mesh-of-doom`",
            ),
        ];
        for (text, want) in cases {
            let err = Topology::parse(&text, Path::new("bad.toml")).unwrap_err().to_string();
            assert!(err.starts_with("bad.toml"), "{err}");
            assert!(err.contains(want), "{err} should contain {want}");
        }
    }

    #[test]
    fn every_shipped_topology_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("topology");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                Topology::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen > 0, "no topology files found in {}", dir.display());
    }

    const RING: &str = r#"
version = 1
mesh = "test"
shape = "ring"
[[nodes]]
id = "a"
region = "ra"
address = "127.0.0.1:1"
[[nodes]]
id = "b"
region = "rb"
address = "127.0.0.1:2"
[[nodes]]
id = "c"
region = "rc"
address = "127.0.0.1:3"
"#;

    #[test]
    fn links_take_the_mesh_transport_unless_named_and_kafka_needs_a_cluster_per_region() {
        let kafka = format!(
            "transport = \"kafka\"\n{RING}[kafka]\nbootstrap = \"k:9092\"\n[kafka.regions]\nrc = \"kc:9092\"\n"
        );
        let t = Topology::parse(&kafka, Path::new("t.toml")).unwrap();
        assert_eq!(t.link_transport("a", "b"), Transport::Kafka);
        assert_eq!(t.kafka_bootstrap("ra"), Some("k:9092"));
        assert_eq!(t.kafka_bootstrap("rc"), Some("kc:9092"));
        // It writes back as it reads (the loopback harness writes topologies with toml).
        let again = Topology::parse(&toml::to_string(&t).unwrap(), Path::new("t.toml")).unwrap();
        assert_eq!(again, t);

        let mixed = format!(
            "{RING}[[links]]\nbetween = [\"b\", \"a\"]\ntransport = \"kafka\"\n[kafka]\nregions = {{ ra = \"k:1\", rb = \"k:2\" }}\n"
        );
        let t = Topology::parse(&mixed, Path::new("t.toml")).unwrap();
        assert_eq!(t.link_transport("a", "b"), Transport::Kafka);
        assert_eq!(t.link_transport("b", "c"), Transport::Grpc);

        let link = |between: &str| {
            format!("{RING}[[links]]\nbetween = {between}\ntransport = \"kafka\"\n[kafka]\nbootstrap = \"k:1\"\n")
        };
        let cases = [
            (
                format!("transport = \"kafka\"\n{RING}"),
                "region `ra` has a node on a Kafka link (or publishing [kafka] changes) but no cluster",
            ),
            (
                format!("{RING}[kafka]\nchanges = true\nregions = {{ ra = \"k:1\", rc = \"k:3\" }}\n"),
                "region `rb` has a node on a Kafka link (or publishing [kafka] changes) but no cluster",
            ),
            (
                format!("transport = \"kafka\"\n{RING}[kafka]\nregions = {{ ra = \"k:1\", rb = \"k:2\" }}\n"),
                "region `rc` has a node on a Kafka link",
            ),
            (link("[\"a\", \"z\"]"), "unknown node `z`"),
            (link("[\"a\", \"a\"]"), "names `a` twice"),
            (
                format!(
                    "{RING}[[links]]\nbetween = [\"a\", \"b\"]\ntransport = \"kafka\"\n[[links]]\nbetween = [\"b\", \"a\"]\ntransport = \"grpc\"\n[kafka]\nbootstrap = \"k:1\"\n"
                ),
                "named twice",
            ),
            (
                format!("{RING}[kafka]\nregions = {{ mars = \"k:1\" }}\n"),
                "no node is in region `mars`",
            ),
            (format!("transport = \"pigeon\"\n{RING}"), "unknown variant `pigeon`"),
        ];
        for (text, want) in cases {
            let err = Topology::parse(&text, Path::new("bad.toml")).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should contain {want}");
        }
        // In a one-way ring a and c do exchange events (c sends to a); in a star, two spokes
        // do not.
        let star = RING.replace("shape = \"ring\"", "shape = \"star\"\nhub = \"a\"");
        let text =
            format!("{star}[[links]]\nbetween = [\"b\", \"c\"]\ntransport = \"kafka\"\n[kafka]\nbootstrap = \"k:1\"\n");
        let err = Topology::parse(&text, Path::new("bad.toml")).unwrap_err().to_string();
        assert!(err.contains("exchange no events in this shape"), "{err}");
    }

    #[test]
    fn kafka_settings_pass_through_but_not_the_ones_weft_sets() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        let f =
            node_file("[kafka.settings]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"");
        let c = NodeConfig::resolve(f, t.clone(), Path::new("a.toml")).unwrap();
        assert_eq!(c.kafka.get("security.protocol").map(String::as_str), Some("SASL_SSL"));
        let f = node_file("[kafka.settings]\n\"auto.offset.reset\" = \"latest\"");
        let err = NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kafka.settings.auto.offset.reset") && err.contains("set by weft"),
            "{err}"
        );
        let f = node_file("[kafka.settings]\n\"message.max.bytes\" = \"2000000\"");
        let err = NodeConfig::resolve(f, t, Path::new("a.toml")).unwrap_err().to_string();
        assert!(err.contains("from [replication] max_message_mib"), "{err}");
    }

    #[test]
    fn max_message_mib_on_kafka_stays_within_what_a_record_can_hold() {
        let on_kafka = format!("{TOPOLOGY}[kafka]\nchanges = true\nbootstrap = \"k:1\"\n");
        let at = |mib: usize, topology: &str| {
            let t = Topology::parse(topology, Path::new("t.toml")).unwrap();
            let f = node_file(&format!("[replication]\nmax_message_mib = {mib}"));
            NodeConfig::resolve(f, t, Path::new("a.toml")).map_err(|e| e.to_string())
        };
        assert!(at(KAFKA_MAX_MESSAGE_MIB, &on_kafka).is_ok());
        let err = at(KAFKA_MAX_MESSAGE_MIB + 1, &on_kafka).unwrap_err();
        assert!(
            err.contains("replication.max_message_mib") && err.contains("at most 900"),
            "{err}"
        );
        assert!(at(2_000, TOPOLOGY).is_ok(), "gRPC alone has no such ceiling");
    }

    #[test]
    fn the_http_section_takes_an_address_a_lag_and_a_token_file() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        let f = node_file("[http]\nlisten = \"0.0.0.0:9464\"\ntoken_file = \"scrape.token\"");
        let c = NodeConfig::resolve(f, t.clone(), Path::new("a.toml")).unwrap();
        let http = c.http.unwrap();
        assert_eq!(http.listen.port(), 9464);
        assert_eq!(http.ready_max_lag, std::time::Duration::from_secs(30), "the default");
        assert_eq!(http.token_file.as_deref(), Some(Path::new("scrape.token")));
        assert_eq!(
            NodeConfig::resolve(node_file(""), t.clone(), Path::new("a.toml"))
                .unwrap()
                .http,
            None
        );
        let f = node_file("[http]\nlisten = \"metrics.local\"");
        let err = NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.listen") && err.contains("not a host:port"), "{err}");
        // The console acts on the database: never without a token, and never with the
        // scrape token (a Prometheus credential sits in many configs).
        for extra in ["", "token_file = \"t\"\n"] {
            let f = node_file(&format!("[http]\nlisten = \"0.0.0.0:9464\"\nconsole = true\n{extra}"));
            let err = NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("http.console") && err.contains("set http.console_token_file"),
                "{err}"
            );
        }
        let f = node_file(
            "[http]\nlisten = \"0.0.0.0:9464\"\nconsole = true\ntoken_file = \"t\"\nconsole_token_file = \"t\"",
        );
        let err = NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http.console_token_file") && err.contains("scrape"),
            "{err}"
        );
        let f = node_file("[http]\nlisten = \"0.0.0.0:9464\"\nconsole = true\nconsole_token_file = \"c\"");
        let http = NodeConfig::resolve(f, t, Path::new("a.toml")).unwrap().http.unwrap();
        assert!(http.console && http.token_file.is_none());
        assert_eq!(http.console_token_file.as_deref(), Some(Path::new("c")));
    }

    fn node_file(extra: &str) -> NodeConfigFile {
        toml::from_str(&format!(
            "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"sqlite://a.db\"\n{extra}\n[[tables]]\nname = \"items\"\nstrategy = \"lww\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn resolves_a_node_config() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        let c = NodeConfig::resolve(node_file(""), t, Path::new("a.toml")).unwrap();
        assert_eq!(c.listen, "127.0.0.1:1");
        assert_eq!(c.database, Database::Sqlite("a.db".into()));
        assert_eq!(c.region(), "ra");
    }

    #[test]
    fn refuses_bad_node_configs() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        let mut f = node_file("");
        f.node = "z".into();
        let err = NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.toml: node: `z` is not in the topology (nodes: a, b)"),
            "{err}"
        );

        let mut f = node_file("");
        f.tables[0].name = "_weft_log".into();
        let err = NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tables[0].name"), "{err}");

        let err = toml::from_str::<NodeConfigFile>("version = 1\nnodes = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `nodes`"), "{err}");

        let f = node_file("[replication]\nheartbeat_ms = 5000\npeer_timeout_ms = 100");
        let err = NodeConfig::resolve(f, t, Path::new("a.toml")).unwrap_err().to_string();
        assert!(err.contains("peer_timeout_ms"), "{err}");
    }

    #[test]
    fn tls_takes_three_files_or_an_explicit_insecure() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        let resolve = |tls: &str| {
            let f: NodeConfigFile = toml::from_str(&format!(
                "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"a.db\"\n\
                 [[tables]]\nname = \"items\"\nstrategy = \"lww\"\n{tls}"
            ))
            .unwrap();
            NodeConfig::resolve(f, t.clone(), Path::new("a.toml")).map(|c| c.security)
        };
        assert_eq!(resolve("").unwrap(), Security::Unset);
        assert_eq!(resolve("[tls]\ninsecure = true").unwrap(), Security::Insecure);
        let tls = resolve("[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"").unwrap();
        assert!(matches!(tls, Security::Tls { .. }), "{tls:?}");
        let err = resolve("[tls]\nca = \"ca.pem\"").unwrap_err().to_string();
        assert!(
            err.contains("needs ca, cert and key") && err.contains("weft certs"),
            "{err}"
        );
        let err = resolve("[tls]\ninsecure = true\nca = \"ca.pem\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("choose one"), "{err}");
    }

    #[test]
    fn checks_owner_rules() {
        let t = Topology::parse(TOPOLOGY, Path::new("t.toml")).unwrap();
        let owned = |extra: &str| {
            let f: NodeConfigFile = toml::from_str(&format!(
                "version = 1\nnode = \"a\"\ntopology = \"t.toml\"\ndatabase = \"sqlite://a.db\"\n[[tables]]\nname = \"w\"\nstrategy = \"ownership\"\n{extra}\n"
            ))
            .map_err(|e| e.to_string())?;
            NodeConfig::resolve(f, t.clone(), Path::new("a.toml"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(owned("owner_rule = { prefix = \"-\" }"), Ok(()));
        assert_eq!(
            owned("owner_rule = { column = \"id\", prefix = \":\", regions = { e = \"ra\" } }"),
            Ok(())
        );
        assert_eq!(
            owned(
                "owner_rule = { ranges = [{ from = 0, to = 9, region = \"ra\" }, { from = 10, to = 19, region = \"rb\" }] }"
            ),
            Ok(())
        );
        let cases = [
            ("", "name the column holding it (owner_column"),
            ("owner_column = \"h\"\nowner_rule = { prefix = \"-\" }", "not both"),
            ("owner_rule = { }", "exactly one of prefix"),
            (
                "owner_rule = { prefix = \"-\", ranges = [{ from = 0, to = 1, region = \"ra\" }] }",
                "exactly one of prefix",
            ),
            ("owner_rule = { prefix = \"\" }", "prefix must not be empty"),
            (
                "owner_rule = { prefix = \"-\", regions = { e = \"mars\" } }",
                "`mars` is not a region",
            ),
            (
                "owner_rule = { ranges = [{ from = 0, to = 10, region = \"ra\" }, { from = 10, to = 19, region = \"rb\" }] }",
                "overlap",
            ),
            (
                "owner_rule = { ranges = [{ from = 5, to = 1, region = \"ra\" }] }",
                "from must be <= to",
            ),
            (
                "owner_rule = { ranges = [{ from = 0, to = 1, region = \"ra\" }], regions = { e = \"ra\" } }",
                "regions applies to prefix",
            ),
            ("owner_rule = { prefix = \"-\", colour = 1 }", "unknown field `colour`"),
        ];
        for (extra, expected) in cases {
            let err = owned(extra).unwrap_err();
            assert!(err.contains(expected), "{extra}: {err}");
        }
    }
}
