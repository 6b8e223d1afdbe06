"""The compute-party process: gRPC server, model store, inference sessions."""
