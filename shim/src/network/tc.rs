//! The tc messages that splice a namespace interface to a TAP: an ingress
//! qdisc on each, and a u32 match-everything filter whose mirred action
//! redirects each one's ingress to the other's egress (Kata's "tcfilter"
//! model). Unlike a bridge or macvtap it needs no extra device or module
//! beyond tc's, and the namespace's own stack never sees the guest's frames.

use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};

/// ETH_P_ALL, in network byte order as tc wants the filter's protocol.
const ALL_PROTOCOLS: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The filter's priority (any: it is the qdisc's only filter).
const PRIORITY: u16 = 1;

fn ingress_parent() -> TcHandle {
    TcHandle {
        major: 0xffff,
        minor: 0,
    }
}

/// The ingress qdisc of interface `index` (to add or delete).
pub fn ingress_qdisc(index: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = ingress_parent();
    msg.attributes.push(TcAttribute::Kind("ingress".into()));
    msg
}

/// A filter on `from`'s ingress that sends every frame out of `to`.
pub fn redirect(from: u32, to: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(from as i32);
    msg.header.parent = ingress_parent();
    msg.header.info = (u32::from(PRIORITY) << 16) | u32::from(ALL_PROTOCOLS);

    let mut key = TcU32Key::default();
    key.mask = 0;
    key.val = 0;
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![key];

    let mut generic = TcActionGeneric::default();
    generic.action = TcActionType::Stolen;
    let mut mirror = TcMirror::default();
    mirror.generic = generic;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];

    msg.attributes
        .push(TcAttribute::Kind(TcFilterU32::KIND.into()));
    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(selector)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    msg
}
