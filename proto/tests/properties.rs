//! Property tests of config parsing and validation: whatever text a config
//! file or an Apply request holds, `parse_yaml` and `prepare` answer with a
//! config or an error, never a panic; and a config `prepare` accepted
//! survives being written out (`to_yaml`) and read back.

use proptest::prelude::*;
use remora_proto::{duration, parse_yaml, prepare};

/// Cases per property: enough to reach every branch of the grammar below,
/// few enough for a few seconds in a debug build.
const CASES: u32 = 512;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A YAML scalar: words the schema knows, numbers at and past the edges of
/// their types, and text YAML treats specially.
fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        // Known names and values.
        Just("api".to_string()),
        Just("web".to_string()),
        Just("shop/api".to_string()),
        Just("Service".to_string()),
        Just("HTTPRoute".to_string()),
        Just("http".to_string()),
        Just("tcp".to_string()),
        Just("grpc".to_string()),
        Just("Exact".to_string()),
        Just("PathPrefix".to_string()),
        Just("RegularExpression".to_string()),
        Just("Header".to_string()),
        Just("ClientIdentity".to_string()),
        Just("Mesh".to_string()),
        Just("inbound".to_string()),
        Just("outbound".to_string()),
        Just("second".to_string()),
        Just("PassThrough".to_string()),
        Just("RegistryOnly".to_string()),
        Just("Strict".to_string()),
        Just("websocket".to_string()),
        Just("h2c".to_string()),
        Just("/admin".to_string()),
        Just("/".to_string()),
        Just("'(a|b'".to_string()),
        Just("'x{1000}{1000}'".to_string()),
        Just("127.0.0.1".to_string()),
        Just("::1".to_string()),
        Just("spiffe://mesh.test/ns/default/sa/web".to_string()),
        Just("10s".to_string()),
        Just("99999h".to_string()),
        Just("1m30s".to_string()),
        // Numbers.
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("65535".to_string()),
        Just("65536".to_string()),
        Just("4294967295".to_string()),
        Just("4294967296".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e400".to_string()),
        Just(".nan".to_string()),
        Just("0x10".to_string()),
        // YAML's own.
        Just("~".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("''".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("*anchor".to_string()),
        Just("!!binary aGk=".to_string()),
        Just("\"\\u0000\"".to_string()),
        "[a-z0-9./-]{0,12}",
        any::<u32>().prop_map(|n| n.to_string()),
    ]
}

/// Field names of every kind's spec (and some that exist nowhere).
fn field() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "ports",
        "port",
        "protocol",
        "targetPort",
        "name",
        "endpoints",
        "address",
        "meshed",
        "calls",
        "mtls",
        "mode",
        "clientIdentityHeader",
        "serviceAccount",
        "addresses",
        "parentRefs",
        "rules",
        "matches",
        "path",
        "type",
        "value",
        "headers",
        "queryParams",
        "method",
        "filters",
        "requestHeaderModifier",
        "set",
        "add",
        "remove",
        "requestMirror",
        "backendRef",
        "percent",
        "backendRefs",
        "weight",
        "namespace",
        "kind",
        "timeouts",
        "request",
        "backendRequest",
        "retry",
        "codes",
        "attempts",
        "backoff",
        "budget",
        "minRetriesPerSecond",
        "interval",
        "allowedUpgrades",
        "targetRef",
        "direction",
        "limits",
        "key",
        "requests",
        "per",
        "burst",
        "overrides",
        "scope",
        "dryRun",
        "responseHeaders",
        "from",
        "identity",
        "trustDomain",
        "outboundTrafficPolicy",
        "encodedSlashes",
        "labels",
        "nonIdempotent",
        "bogus",
    ])
}

/// A YAML value in flow style, nested up to a few levels, made of the
/// schema's field names and `scalar()`s: mostly the right shape, often
/// the wrong type.
fn value() -> impl Strategy<Value = String> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((field(), inner), 0..5).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{{}}}", body.join(", "))
            }),
        ]
    })
}

/// Values string fields take: names, kinds, protocols, modes, paths,
/// regular expressions (one that does not compile, one too big),
/// addresses, identities, durations, header names.
const WORDS: &[&str] = &[
    "api",
    "web",
    "shop/api",
    "other/web",
    "Service",
    "HTTPRoute",
    "http",
    "http2",
    "grpc",
    "tcp",
    "udp",
    "Exact",
    "PathPrefix",
    "RegularExpression",
    "Glob",
    "Header",
    "ClientIdentity",
    "SourceAddress",
    "Total",
    "Mesh",
    "Local",
    "inbound",
    "outbound",
    "second",
    "minute",
    "hour",
    "day",
    "PassThrough",
    "Reject",
    "AllowAny",
    "RegistryOnly",
    "Strict",
    "Permissive",
    "Disabled",
    "websocket",
    "h2c",
    "my-proto/1",
    "/admin",
    "/",
    "",
    "/a?b",
    "no-slash",
    "(a|b",
    "x{1000}{1000}{1000}",
    "/x/[0-9]+",
    "127.0.0.1",
    "::1",
    "10.0.0.300",
    "spiffe://mesh.test/ns/default/sa/web",
    "ops",
    "mesh.test",
    "10s",
    "0s",
    "99999h",
    "1m30s",
    "250ms",
    "1.5s",
    "x-user",
    "bad header",
    "host",
    "GET",
    "FETCH",
    "RequestHeaderModifier",
    "RequestMirror",
];

/// What the schema expects at a field, to generate mostly well-shaped
/// documents: a scalar, a list of one shape, or a mapping of fields.
#[derive(Clone, Debug)]
enum Shape {
    /// A string field: one of the schema's words, or any short text.
    Str,
    /// An integer field, at and past the edges of its type.
    Num,
    Bool,
    List(Box<Shape>),
    Map(Vec<(&'static str, Shape)>),
}

fn list(s: Shape) -> Shape {
    Shape::List(Box::new(s))
}

fn map(fields: &[(&'static str, Shape)]) -> Shape {
    Shape::Map(fields.to_vec())
}

/// The spec of each kind, as config.proto has it (camelCase).
fn spec_shape(kind: &str) -> Shape {
    use Shape::{Bool as B, Num as N, Str as S};
    let backend = map(&[
        ("name", S),
        ("namespace", S),
        ("kind", S),
        ("port", N),
        ("weight", N),
    ]);
    let header = map(&[("name", S), ("value", S)]);
    let header_filter = map(&[
        ("set", list(header.clone())),
        ("add", list(header)),
        ("remove", list(S)),
    ]);
    let value_match = map(&[("type", S), ("name", S), ("value", S)]);
    let target = map(&[("kind", S), ("name", S), ("namespace", S)]);
    match kind {
        "Service" => map(&[
            (
                "ports",
                list(map(&[
                    ("name", S),
                    ("port", N),
                    ("protocol", S),
                    ("targetPort", N),
                ])),
            ),
            (
                "endpoints",
                list(map(&[
                    ("address", S),
                    ("port", N),
                    ("meshed", B),
                    ("labels", map(&[("zone", S)])),
                ])),
            ),
            ("calls", list(S)),
            ("mtls", map(&[("mode", S), ("clientIdentityHeader", S)])),
            ("serviceAccount", S),
            ("addresses", list(S)),
        ]),
        "HTTPRoute" => map(&[
            (
                "parentRefs",
                list(map(&[
                    ("kind", S),
                    ("name", S),
                    ("namespace", S),
                    ("port", N),
                ])),
            ),
            (
                "rules",
                list(map(&[
                    ("name", S),
                    (
                        "matches",
                        list(map(&[
                            ("path", map(&[("type", S), ("value", S)])),
                            ("headers", list(value_match.clone())),
                            ("queryParams", list(value_match)),
                            ("method", S),
                        ])),
                    ),
                    (
                        "filters",
                        list(map(&[
                            ("type", S),
                            ("requestHeaderModifier", header_filter.clone()),
                            ("responseHeaderModifier", header_filter),
                            (
                                "requestMirror",
                                map(&[("backendRef", backend.clone()), ("percent", N)]),
                            ),
                        ])),
                    ),
                    ("backendRefs", list(backend)),
                    ("timeouts", map(&[("request", S), ("backendRequest", S)])),
                    (
                        "retry",
                        map(&[
                            ("codes", list(N)),
                            ("attempts", N),
                            ("backoff", S),
                            ("nonIdempotent", B),
                            (
                                "budget",
                                map(&[("percent", N), ("minRetriesPerSecond", N), ("interval", S)]),
                            ),
                        ]),
                    ),
                    ("allowedUpgrades", list(S)),
                ])),
            ),
        ]),
        "RateLimitPolicy" => map(&[
            ("targetRef", target),
            ("direction", S),
            ("dryRun", B),
            ("responseHeaders", B),
            (
                "limits",
                list(map(&[
                    ("name", S),
                    ("key", list(map(&[("type", S), ("name", S)]))),
                    ("requests", N),
                    ("per", S),
                    ("burst", N),
                    (
                        "overrides",
                        list(map(&[("value", S), ("requests", N), ("burst", N)])),
                    ),
                    ("scope", S),
                ])),
            ),
        ]),
        "AuthorizationPolicy" => map(&[
            ("targetRef", target),
            (
                "from",
                list(map(&[
                    ("identity", S),
                    ("namespace", S),
                    ("trustDomain", S),
                ])),
            ),
        ]),
        _ => map(&[("outboundTrafficPolicy", S), ("encodedSlashes", S)]),
    }
}

/// A value of `shape` in flow style: mostly the right shape, each part
/// replaced now and then by any `value()` (the wrong type, an unknown
/// field).
fn shaped(shape: Shape, depth: u32) -> BoxedStrategy<String> {
    let right: BoxedStrategy<String> = match shape {
        Shape::Str => prop_oneof![
            4 => prop::sample::select(WORDS).prop_map(|w| format!("'{w}'")),
            1 => "[a-z0-9./-]{0,12}".prop_map(|w| format!("'{w}'")),
        ]
        .boxed(),
        Shape::Num => prop_oneof![
            4 => 0u32..100,
            1 => prop::sample::select(vec![80, 443, 65535, 65536, 1_000_000, 1_000_001, u32::MAX]),
        ]
        .prop_map(|n| n.to_string())
        .boxed(),
        Shape::Bool => any::<bool>().prop_map(|b| b.to_string()).boxed(),
        Shape::List(item) => prop::collection::vec(shaped(*item, depth + 1), 0..3)
            .prop_map(|v| format!("[{}]", v.join(", ")))
            .boxed(),
        Shape::Map(fields) => {
            let parts: Vec<BoxedStrategy<Option<String>>> = fields
                .into_iter()
                .map(|(name, s)| {
                    prop::option::weighted(0.5, shaped(s, depth + 1))
                        .prop_map(move |v| v.map(|v| format!("{name}: {v}")))
                        .boxed()
                })
                .collect();
            parts
                .prop_map(|p| {
                    format!(
                        "{{{}}}",
                        p.into_iter().flatten().collect::<Vec<_>>().join(", ")
                    )
                })
                .boxed()
        }
    };
    if depth > 6 {
        return right;
    }
    prop_oneof![60 => right, 1 => value()].boxed()
}

/// One resource document: a kind (known, unknown or missing), metadata,
/// and a spec shaped for its kind (or for another kind).
fn document() -> impl Strategy<Value = String> {
    let kinds = vec![
        "Service",
        "HTTPRoute",
        "RateLimitPolicy",
        "AuthorizationPolicy",
        "MeshConfig",
    ];
    let kind = prop_oneof![
        12 => prop::sample::select(kinds.clone()),
        1 => prop::sample::select(vec!["Gateway", ""]),
    ];
    let name = prop_oneof![
        Just("api"),
        Just("web"),
        Just("mesh"),
        Just("Bad_Name"),
        Just(""),
    ];
    let namespace = prop_oneof![Just(""), Just("shop"), Just("default"), Just("-x")];
    // The spec shaped for the document's own kind, mostly.
    let kind_and_spec = (kind, prop::sample::select(kinds), prop::bool::weighted(0.9))
        .prop_flat_map(|(kind, other, own)| {
            let shape = if own && !kind.is_empty() { kind } else { other };
            (Just(kind), shaped(spec_shape(shape), 0))
        });
    (kind_and_spec, name, namespace).prop_map(|((kind, spec), name, ns)| {
        let mut d = String::new();
        if !kind.is_empty() {
            d.push_str(&format!("kind: {kind}\n"));
        }
        d.push_str(&format!("metadata: {{name: '{name}'"));
        if !ns.is_empty() {
            d.push_str(&format!(", namespace: '{ns}'"));
        }
        d.push_str(&format!("}}\nspec: {spec}\n"));
        d
    })
}

fn documents() -> impl Strategy<Value = String> {
    prop::collection::vec(document(), 1..5).prop_map(|docs| docs.join("---\n"))
}

/// Configs that validation should accept: Services with ports and
/// endpoints, a route over them with generated matches and backends, a
/// rate limit and an authorization policy, in a namespace or none.
fn valid_ish() -> impl Strategy<Value = String> {
    let path = prop_oneof![
        Just("{type: Exact, value: /admin}".to_string()),
        Just("{type: PathPrefix, value: /a}".to_string()),
        Just("{type: RegularExpression, value: '/x/[0-9]+'}".to_string()),
        "/[a-z]{0,6}".prop_map(|p| format!("{{value: {p}}}")),
    ];
    let rule = (
        prop::collection::vec(path, 0..3),
        prop::collection::vec((prop_oneof![Just("api"), Just("web")], 0u32..5), 1..3),
        prop_oneof![
            Just(""),
            Just(", timeouts: {request: 2s}"),
            Just(", retry: {codes: [503], attempts: 2}")
        ],
    )
        .prop_map(|(paths, backends, extra)| {
            let matches: Vec<String> = paths.iter().map(|p| format!("{{path: {p}}}")).collect();
            let refs: Vec<String> = backends
                .iter()
                .map(|(n, w)| format!("{{name: {n}, weight: {w}}}"))
                .collect();
            format!(
                "  - {{matches: [{}], backendRefs: [{}]{extra}}}\n",
                matches.join(", "),
                refs.join(", ")
            )
        });
    (
        prop_oneof![Just(""), Just("shop")],
        1u32..65535,
        prop_oneof![Just("http"), Just("grpc"), Just("tcp"), Just("http2")],
        prop::collection::vec(rule, 1..4),
        1u32..1000,
        any::<bool>(),
    )
        .prop_map(|(ns, port, proto, rules, requests, authz)| {
            let ns_field = if ns.is_empty() { String::new() } else { format!(", namespace: {ns}") };
            let mut y = String::new();
            for name in ["api", "web"] {
                y.push_str(&format!(
                    "kind: Service\nmetadata: {{name: {name}{ns_field}}}\nspec:\n  ports: [{{port: {port}, protocol: {proto}}}]\n  endpoints: [{{address: 127.0.0.1, port: 8080}}]\n---\n"
                ));
            }
            y.push_str(&format!(
                "kind: HTTPRoute\nmetadata: {{name: r{ns_field}}}\nspec:\n  parentRefs: [{{name: api}}]\n  rules:\n"
            ));
            for r in &rules {
                y.push_str(r);
            }
            y.push_str(&format!(
                "---\nkind: RateLimitPolicy\nmetadata: {{name: rl{ns_field}}}\nspec:\n  targetRef: {{kind: HTTPRoute, name: r}}\n  limits: [{{name: l, requests: {requests}, per: minute, key: [{{type: Header, name: x-user}}]}}]\n"
            ));
            if authz {
                y.push_str(&format!(
                    "---\nkind: AuthorizationPolicy\nmetadata: {{name: ap{ns_field}}}\nspec:\n  targetRef: {{kind: HTTPRoute, name: r}}\n  from: [{{namespace: ops}}]\n"
                ));
            }
            y
        })
}

proptest! {
    #![proptest_config(config())]

    /// Any text: parsed or refused, never a panic; and whatever parsed is
    /// validated without a panic.
    #[test]
    fn any_text_parses_or_fails_without_panicking(text in any::<String>()) {
        if let Ok(cfg) = parse_yaml(&text, "any") {
            let _ = prepare(cfg);
        }
    }

    /// Text that is almost YAML: the structure characters and keywords in
    /// random order.
    #[test]
    fn yaml_shaped_noise_parses_or_fails_without_panicking(
        text in "(kind|spec|metadata|name|---|:|-|\\[|\\]|\\{|\\}|,|\n|  |'|\"|&a|\\*a|!!str|#|[a-z0-9]{1,4}| ){0,60}"
    ) {
        if let Ok(cfg) = parse_yaml(&text, "noise") {
            let _ = prepare(cfg);
        }
    }

    /// Documents of the right kinds with fields of the schema, most of
    /// them the wrong shape: parsed or refused, validated or refused, and
    /// every refusal says which resource.
    #[test]
    fn structured_documents_parse_and_validate_without_panicking(text in documents()) {
        match parse_yaml(&text, "docs") {
            Ok(cfg) => {
                if let Err(errors) = prepare(cfg) {
                    prop_assert!(!errors.0.is_empty());
                    for e in &errors.0 {
                        prop_assert!(!e.resource.is_empty() && !e.message.is_empty(), "{e:?}");
                    }
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// A config validation accepted is the same config once written out
    /// and read back: what remoractl prints is what was applied.
    #[test]
    fn an_accepted_config_round_trips_through_yaml(text in valid_ish()) {
        let cfg = parse_yaml(&text, "valid").map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let Ok(ready) = prepare(cfg) else {
            // Generated configs can be invalid (e.g. every weight 0): fine.
            return Ok(());
        };
        let out = remora_proto::yaml::to_yaml(&ready);
        let back = parse_yaml(&out, "out").map_err(|e| TestCaseError::fail(format!("{e}\n{out}")))?;
        let back = prepare(back).map_err(|e| TestCaseError::fail(format!("{e}\n{out}")))?;
        prop_assert_eq!(back, ready, "{}", out);
    }

    /// Durations: any text is a duration or an error, never a panic; one
    /// made of parts is their sum.
    #[test]
    fn durations_parse_or_fail_without_panicking(
        text in any::<String>(),
        parts in prop::collection::vec((0u64..100_000, prop::sample::select(vec!["h", "m", "s", "ms"])), 1..5),
    ) {
        let _ = duration::parse(&text);
        let _ = duration::parse_opt(&text);
        let written: String = parts.iter().map(|(n, u)| format!("{n}{u}")).collect();
        let want: u64 = parts
            .iter()
            .map(|(n, u)| match *u {
                "h" => n * 3_600_000,
                "m" => n * 60_000,
                "s" => n * 1000,
                _ => *n,
            })
            .sum();
        prop_assert_eq!(duration::parse(&written).map(|d| d.as_millis() as u64), Ok(want), "{}", written);
    }
}
