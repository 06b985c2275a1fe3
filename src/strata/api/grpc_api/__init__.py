"""Strata's API over gRPC (proto/strata/v1/strata.proto), served beside the HTTP one on `server.grpc_port`."""
