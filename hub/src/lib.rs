//! remoteingress hub: tunnel listeners, edge sessions, forwarding to targets.
