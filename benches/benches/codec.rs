//! The per-event costs around the transport: JSON encode and decode of a
//! ~150-byte event (through the object-safe `Codec`, beside plain
//! `serde_json` on the same value), envelope construction (attributes,
//! CloudEvents headers both ways), and one upcast step (a v1 event handled
//! as v2, beside the same event published as v2; both inline, in-process,
//! so the difference is the upcast).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use seambus::codec::{Codec, JsonCodec};
use seambus::{Attributes, Bus, Context, Dispatch, Envelope, HandlerError, Module, Received};
use seambus_benches::Done;
use serde::{Deserialize, Serialize};

/// An order event whose JSON is about 150 bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed", version = 1)]
struct PlacedV1 {
    order_id: u64,
    customer: String,
    sku: String,
    quantity: u32,
    amount_cents: u64,
    note: String,
}

/// Version 2 adds the currency; v1 events upcast with "EUR".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed", version = 2)]
struct PlacedV2 {
    order_id: u64,
    customer: String,
    sku: String,
    quantity: u32,
    amount_cents: u64,
    currency: String,
    note: String,
}

impl From<PlacedV1> for PlacedV2 {
    fn from(v1: PlacedV1) -> Self {
        Self {
            order_id: v1.order_id,
            customer: v1.customer,
            sku: v1.sku,
            quantity: v1.quantity,
            amount_cents: v1.amount_cents,
            currency: "EUR".to_owned(),
            note: v1.note,
        }
    }
}

fn v1(order_id: u64) -> PlacedV1 {
    PlacedV1 {
        order_id,
        customer: "customer-000042".to_owned(),
        sku: "SKU-RED-MUG-0007".to_owned(),
        quantity: 3,
        amount_cents: 4_497,
        note: "leave at the door, ring twice".to_owned(),
    }
}

fn codec(c: &mut Criterion) {
    let event = v1(1_234_567);
    let bytes = JsonCodec.encode(&event).expect("encode");
    let mut group = c.benchmark_group("codec/json");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("seambus_encode", |b| {
        b.iter(|| JsonCodec.encode(black_box(&event)).expect("encode"))
    });
    group.bench_function("raw_serde_json_encode", |b| {
        b.iter(|| serde_json::to_vec(black_box(&event)).expect("encode"))
    });
    group.bench_function("seambus_decode", |b| {
        b.iter(|| {
            seambus::codec::decode::<PlacedV1>(&JsonCodec, black_box(&bytes)).expect("decode")
        })
    });
    group.bench_function("raw_serde_json_decode", |b| {
        b.iter(|| serde_json::from_slice::<PlacedV1>(black_box(&bytes)).expect("decode"))
    });
    group.finish();
    println!("codec/json: the event encodes to {} bytes", bytes.len());
}

fn envelope(c: &mut Criterion) {
    let event = v1(7);
    let bytes = JsonCodec.encode(&event).expect("encode");
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    group.bench_function("attributes_new", |b| {
        b.iter(|| Attributes::new("orders", "orders.order_placed", 1))
    });
    group.bench_function("from_bytes", |b| {
        b.iter(|| {
            let attrs = Attributes::new("orders", "orders.order_placed", 1);
            Envelope::from_bytes(attrs, black_box(bytes.clone()))
        })
    });
    let mut attrs = Attributes::new("orders", "orders.order_placed", 1);
    attrs.partition_key = Some("customer-000042".to_owned());
    group.bench_function("to_wire_headers", |b| {
        b.iter(|| black_box(&attrs).to_wire_headers("ce-"))
    });
    let wire = attrs.to_wire_headers("ce-");
    group.bench_function("from_wire_headers", |b| {
        b.iter(|| {
            Attributes::from_wire_headers(
                &["ce-"],
                wire.iter().map(|(n, v)| (n.as_str(), v.as_str())),
                |_| false,
            )
            .expect("headers")
        })
    });
    group.finish();
}

/// A bus whose `orders` module publishes and whose `shipping` module
/// handles v2 inline; with `upcast`, v1 is registered to upcast to v2.
fn bus(rt: &tokio::runtime::Runtime, verify_codec: bool, done: &Arc<Done>) -> (Bus, Module) {
    let bus = Bus::builder()
        .upcast::<PlacedV1, PlacedV2>()
        .verify_codec(verify_codec)
        .build()
        .expect("bus");
    let done = done.clone();
    let shipping = bus.module("shipping");
    rt.block_on(async {
        shipping
            .subscribe(move |e: Received<PlacedV2>, _c: Context| {
                black_box(e.order_id);
                done.hit();
                async { Ok::<(), HandlerError>(()) }
            })
            .dispatch(Dispatch::Inline)
            .await
    })
    .expect("subscribe");
    let orders = bus.module("orders");
    (bus, orders)
}

fn upcast(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // `typed`: in-process shares the value; `encoded`: verify_codec makes
    // every publish go through bytes, as across a broker (decode, then
    // upcast).
    for (mode, verify) in [("typed", false), ("encoded", true)] {
        let mut group = c.benchmark_group(format!("upcast/{mode}"));
        group.throughput(Throughput::Elements(1));
        group.measurement_time(Duration::from_secs(3));
        let done = Done::new();
        let (bus, orders) = bus(&rt, verify, &done);
        group.bench_function("publish_v2_no_upcast", |b| {
            b.to_async(&rt).iter(|| async {
                done.reset(1);
                orders
                    .publish(PlacedV2::from(v1(1)))
                    .await
                    .expect("publish");
                done.wait().await;
            })
        });
        group.bench_function("publish_v1_one_upcast_step", |b| {
            b.to_async(&rt).iter(|| async {
                done.reset(1);
                orders.publish(v1(1)).await.expect("publish");
                done.wait().await;
            })
        });
        rt.block_on(bus.shutdown(Duration::from_secs(5)))
            .expect("shutdown");
        group.finish();
    }
}

criterion_group!(benches, codec, envelope, upcast);
criterion_main!(benches);
