"""The kubelet's PodResources v1 gRPC API: stubs generated from its api.proto, checked in.

api.proto is k8s.io/kubelet v0.36.3 (Kubernetes 1.36.3, commit bbb4f8f0905),
pkg/apis/podresources/v1/api.proto, unchanged. The stubs were generated with grpcio-tools 1.85.1
(protobuf 7.35.1), hence the `kubernetes` extra's floors; to regenerate, from the repository root:

    python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. agent/podresources/api.proto

(then put back the two header lines of each generated file). Importing this package's modules needs
grpcio and protobuf (`pip install 'fleetscope[kubernetes]'`); agent/kubernetes.py imports them lazily.
"""
