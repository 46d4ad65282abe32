"""Generated gRPC code of the Open Inference Protocol (see scripts/generate_v2_grpc.py)."""
