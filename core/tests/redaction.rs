//! Issue 12, item 6: error text about a payload names the field and the
//! problem, never the value. Decode errors reach `warn` logs, dead letters'
//! `error` and broker headers, so a value quoted in them leaks the payload.

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};

use seambus::codec::{self, Codec, JsonCodec, Visit};
use seambus::conformance::poll_until;
use seambus::transport::DeadLetter;
use seambus::{
    Attributes, Bus, Context, DeadLetterReason, Envelope, ErrorKind, HandlerError, Received,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Status {
    Pending,
    Paid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    sku: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_paid", version = 1)]
struct OrderPaid {
    order_id: u64,
    status: Status,
    items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.refunded", version = 1)]
struct RefundedV1 {
    order_id: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.refunded", version = 2)]
struct RefundedV2 {
    order_id: u64,
    reason: String,
}

impl From<RefundedV1> for RefundedV2 {
    fn from(v1: RefundedV1) -> Self {
        Self {
            order_id: v1.order_id,
            reason: String::new(),
        }
    }
}

/// An email address whose own `TryFrom` error quotes the input: a custom
/// error from user code, which can hold anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String")]
struct Email(String);

impl TryFrom<String> for Email {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.contains('@') {
            Ok(Self(s))
        } else {
            Err(format!("not an email address: {s}"))
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Customer {
    email: Email,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Strict {
    order_id: u64,
}

/// Every string in the payloads below that counts as a secret starts so.
const SECRET: &str = "s3cr3t";

fn assert_no_secret(what: &str, text: &str) {
    assert!(!text.contains(SECRET), "{what} leaks the value: {text}");
}

/// Checks an error's message, Display, Debug and whole `source()` chain.
fn assert_redacted(input: &str, err: &seambus::Error) {
    assert_eq!(err.kind(), ErrorKind::Decode, "{input}");
    assert_no_secret("message", err.message());
    assert_no_secret("Display", &err.to_string());
    assert_no_secret("Debug", &format!("{err:?}"));
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        assert_no_secret("source Display", &s.to_string());
        assert_no_secret("source Debug", &format!("{s:?}"));
        source = s.source();
    }
}

fn assert_names(err: &str, needles: &[&str]) {
    for needle in needles {
        assert!(err.contains(needle), "{err:?} does not say {needle:?}");
    }
}

/// The JSON codec reached only through the object-safe `decode_with` (what
/// a codec that delegates to JSON looks like to `codec::decode`).
struct ErasedJson;

impl Codec for ErasedJson {
    fn content_type(&self) -> &'static str {
        codec::JSON_CONTENT_TYPE
    }
    fn encode(&self, value: &dyn erased_serde::Serialize) -> seambus::Result<Vec<u8>> {
        JsonCodec.encode(value)
    }
    fn decode_with(&self, bytes: &[u8], visit: &mut Visit<'_>) -> seambus::Result<()> {
        JsonCodec.decode_with(bytes, visit)
    }
}

/// Decodes `input` on both paths (typed and object-safe), checks neither
/// quotes a secret and both name what `needles` lists; returns the typed
/// path's message.
fn decode_err<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    input: &str,
    needles: &[&str],
) -> String {
    let typed = codec::decode::<T>(&JsonCodec, input.as_bytes()).unwrap_err();
    let erased = codec::decode::<T>(&ErasedJson, input.as_bytes()).unwrap_err();
    for err in [&typed, &erased] {
        assert_redacted(input, err);
        assert_names(err.message(), needles);
    }
    typed.message().to_owned()
}

#[test]
fn a_value_of_the_wrong_type_is_named_by_field_and_type_not_by_value() {
    decode_err::<OrderPaid>(
        r#"{"order_id":"s3cr3t-value","status":"Paid","items":[]}"#,
        &[
            "order_id",
            "invalid type",
            "string",
            "expected u64",
            "line 1",
        ],
    );
    // Quotes and the separator of serde's message inside the value do not
    // shift what is kept.
    decode_err::<OrderPaid>(
        r#"{"order_id":"x\", expected s3cr3t `y`","status":"Paid","items":[]}"#,
        &["order_id", "invalid type", "expected u64"],
    );
    decode_err::<OrderPaid>(
        r#"{"order_id":7,"status":"Paid","items":[{"sku":1},{"sku":2},{"sku":"s3cr3t"}]}"#,
        &["items[2].sku", "invalid type", "expected u32"],
    );
    // A number out of range is an invalid value; the number is not shown.
    let msg = decode_err::<Item>(r#"{"sku":98765432101}"#, &["sku", "invalid value"]);
    assert!(!msg.contains("98765432101"), "{msg}");
    let msg = decode_err::<Item>(r#"{"sku":true}"#, &["sku", "invalid type: boolean"]);
    assert!(!msg.contains("true"), "{msg}");
}

#[test]
fn an_unknown_variant_is_named_by_field_not_by_value() {
    let msg = decode_err::<OrderPaid>(
        r#"{"order_id":1,"status":"s3cr3t-variant","items":[]}"#,
        &["status", "unknown variant", "`Pending`", "`Paid`"],
    );
    assert!(!msg.contains("variant`"), "{msg}");
    // A variant that imitates the end of serde's message.
    decode_err::<OrderPaid>(
        r#"{"order_id":1,"status":"s3cr3t`, expected `Paid","items":[]}"#,
        &["status", "unknown variant", "`Pending` or `Paid`"],
    );
    // Externally tagged, as a map key.
    decode_err::<OrderPaid>(
        r#"{"order_id":1,"status":{"s3cr3t":null},"items":[]}"#,
        &["status", "unknown variant"],
    );
}

#[test]
fn a_custom_error_from_user_code_is_invalid_data_with_its_place() {
    decode_err::<Customer>(
        r#"{"email":"s3cr3t.example.com"}"#,
        &["email", "invalid data", "line 1", "column"],
    );
}

#[test]
fn schema_names_and_syntax_errors_are_kept() {
    decode_err::<Strict>(
        r#"{"order_id":1,"extra":2}"#,
        &["unknown field `extra`", "expected `order_id`"],
    );
    decode_err::<OrderPaid>(r#"{"order_id":1,"items":[]}"#, &["missing field `status`"]);
    decode_err::<OrderPaid>(
        r#"{"order_id":1,"order_id":2,"status":"Paid","items":[]}"#,
        &["duplicate field `order_id`"],
    );
    decode_err::<(u32, u32)>("[1]", &["invalid length 1", "expected a tuple of size 2"]);
    decode_err::<OrderPaid>(
        r#"{"order_id":1,"status":"s3cr3t"#,
        &["EOF while parsing", "line 1", "column"],
    );
    decode_err::<Item>("{\"sku\":1} s3cr3t", &["trailing characters", "line 1"]);
    decode_err::<Item>(
        "{\"sku\":1,\n\"s3cr3t\" 2}",
        &["expected `:`", "line 2", "column"],
    );
}

#[test]
fn the_json_codecs_object_safe_path_does_not_quote_the_value_either() {
    // `JsonCodec::decode_with` called directly, with a visitor of its own.
    let input = br#"{"order_id":"s3cr3t-value","status":"Paid","items":[]}"#;
    let err = JsonCodec
        .decode_with(input, &mut |de| {
            erased_serde::deserialize::<OrderPaid>(de).map(drop)
        })
        .unwrap_err();
    assert_redacted("decode_with", &err);
    assert_names(err.message(), &["invalid type", "expected u64"]);
}

/// A `tracing` subscriber that keeps everything logged on this thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn raw(event_type: &str, version: u32, payload: &'static str) -> Envelope {
    Envelope::from_bytes(
        Attributes::new("orders", event_type.to_owned(), version),
        payload.as_bytes(),
    )
}

async fn noop<E>(_e: Received<E>, _c: Context) -> Result<(), HandlerError> {
    Ok(())
}

// Current-thread: the handlers run on this thread, under the log capture.
#[tokio::test(flavor = "current_thread")]
async fn dead_letters_and_logs_name_the_field_never_the_value() {
    let logs = Logs::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let bus = Bus::builder()
        .upcast::<RefundedV1, RefundedV2>()
        .build()
        .unwrap();
    let paid = bus
        .module("billing")
        .subscribe(noop::<OrderPaid>)
        .await
        .unwrap();
    let refunded = bus
        .module("billing")
        .subscribe(noop::<RefundedV2>)
        .await
        .unwrap();
    let cases = [
        (
            raw(
                "orders.order_paid",
                1,
                r#"{"order_id":"s3cr3t-value","status":"Paid","items":[]}"#,
            ),
            &["order_id", "invalid type", "expected u64"][..],
        ),
        (
            raw(
                "orders.order_paid",
                1,
                r#"{"order_id":1,"status":"s3cr3t-variant","items":[]}"#,
            ),
            &["status", "unknown variant", "`Paid`"][..],
        ),
        (
            raw(
                "orders.order_paid",
                1,
                r#"{"order_id":1,"status":"Paid","items":[{"sku":"s3cr3t"}]}"#,
            ),
            &["items[0].sku", "invalid type", "expected u32"][..],
        ),
        // An older version, decoded on the way to an upcast.
        (
            raw("orders.refunded", 1, r#"{"order_id":"s3cr3t-old"}"#),
            &["order_id", "invalid type", "expected u64"][..],
        ),
        // The current version of the upcast event.
        (
            raw(
                "orders.refunded",
                2,
                r#"{"order_id":3,"reason":{"s3cr3t":1}}"#,
            ),
            &["reason", "invalid type: map", "expected a string"][..],
        ),
    ];
    let transport = bus.transport(seambus::IN_PROCESS).unwrap();
    for (env, _) in &cases {
        transport.publish(env.clone()).await.unwrap();
    }
    poll_until("every bad event dead-lettered", || async {
        paid.stats().dead_lettered + refunded.stats().dead_lettered >= 5
    })
    .await;
    let mut dead: Vec<DeadLetter> = paid.dead_letters().await.unwrap();
    dead.extend(refunded.dead_letters().await.unwrap());
    assert_eq!(dead.len(), cases.len());
    let mut seen = HashSet::new();
    for (env, needles) in &cases {
        let dl = dead
            .iter()
            .find(|d| d.envelope.id() == env.id())
            .expect("a dead letter for each bad event");
        assert_eq!(dl.reason, DeadLetterReason::Undecodable, "{}", dl.error);
        assert_no_secret("dead letter error", &dl.error);
        assert_names(&dl.error, needles);
        seen.insert(dl.envelope.id());
    }
    assert_eq!(seen.len(), cases.len());
    let logged = logs.text();
    assert!(
        logged.contains("dead-letter"),
        "the dead letters were logged: {logged}"
    );
    assert_no_secret("the log", &logged);
}

/// A field that encodes to a string but decodes as a number: it does not
/// survive its codec, and `verify_codec` says so without the value.
#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_tokenised", version = 1)]
struct Tokenised {
    #[serde(serialize_with = "as_text")]
    card: u64,
}

fn as_text<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("s3cr3t-{v}"))
}

#[tokio::test]
async fn verify_codec_names_the_field_not_the_value() {
    let bus = Bus::builder().verify_codec(true).build().unwrap();
    let err = bus
        .module("orders")
        .publish(Tokenised { card: 4111 })
        .await
        .unwrap_err();
    assert_redacted("verify_codec", &err);
    assert!(!err.message().contains("4111"), "{err}");
    assert_names(err.message(), &["card", "invalid type", "expected u64"]);
}
