//go:build tools

// Package tools pins the programs a real node runs, built from their Go modules by build.sh:
// containerd with its runc shim and ctr, runc, and crane (images without a Docker daemon).
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
	_ "github.com/google/go-containerregistry/cmd/crane"
	_ "github.com/opencontainers/runc"
)
