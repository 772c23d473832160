//! remoteingress edge: tunnel client, port listeners.
