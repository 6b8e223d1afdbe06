"""Generated protobuf and gRPC code of the secureinfer.v1 wire format.

Do not edit: regenerate with ``python scripts/gen_protos.py`` from ``protos/secureinfer/v1``.
"""
