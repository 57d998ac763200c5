"""The daemon's control APIs: nydusd's HTTP API (`http`) and a gRPC mirror (`grpc_server`)."""
