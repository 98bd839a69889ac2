//! `PeerTable::decapsulate` with a live session: raw datagrams from anyone, and data messages
//! that really decrypt (the input as the inner packet, sealed by the peer), so both the message
//! parsing and everything after decryption (source and destination checks) are reached.
#![no_main]

#[path = "../../tests/support/pair.rs"]
mod pair;

use libfuzzer_sys::fuzz_target;
use meshd::dataplane::delivery::{Delivery, DestinationFilter, GatewayServices};
use meshd::dataplane::{Inbound, Outbound, PeerTable};
use std::sync::{Mutex, OnceLock};

/// The tunnel MTU's receive slot, as the dataplane gives it.
const SLOT: usize = 1420 + 256;

struct State {
    a: PeerTable,
    b: PeerTable,
    filter: DestinationFilter,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        let (a, b) = pair::connected_tables();
        let filter = DestinationFilter::new(&Delivery {
            cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            gateway: Some(GatewayServices {
                address: "100.64.0.2".parse().unwrap(),
                tcp_ports: vec![51821],
                udp_ports: vec![51821],
            }),
        });
        Mutex::new(State { a, b, filter })
    })
}

fuzz_target!(|data: &[u8]| {
    let state = state().lock().unwrap();
    let mut slot = vec![0u8; SLOT];
    let from = pair::addr("192.0.2.1:51820");
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let result = if mode & 1 == 0 {
        state.b.decapsulate(rest, from, &mut slot)
    } else {
        let mut sealed = vec![0u8; rest.len() + 64];
        let Outbound::Send(datagram, _) = state.a.encapsulate(rest, &mut sealed) else {
            return;
        };
        let datagram = datagram.to_vec();
        state.b.decapsulate(&datagram, from, &mut slot)
    };
    if let Inbound::ToTun(packet) = result {
        let _ = state.filter.allows(packet);
    }
});
