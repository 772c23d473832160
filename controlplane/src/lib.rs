//! remoteingress control plane: gRPC services over the hub and edge.
