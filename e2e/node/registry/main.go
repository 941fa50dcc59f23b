// Command registry is the local OCI registry a real node pulls from: CNCF distribution with
// only the filesystem storage driver linked in (the stock command also links the cloud
// drivers), serving one registry on several addresses, so that the host pushes to it on
// loopback and a node in its own network namespace pulls from the host's side of its link.
//
//	registry CONFIG.yaml ADDRESS...
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "registry: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) < 3 {
		return fmt.Errorf("usage: %s CONFIG.yaml ADDRESS...", os.Args[0])
	}
	cfg, err := parseConfig(os.Args[1])
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	server := &http.Server{Handler: handlers.NewApp(ctx, cfg), ReadHeaderTimeout: 30 * time.Second}
	served := make(chan error, len(os.Args)-2)
	for _, address := range os.Args[2:] {
		listener, err := net.Listen("tcp", address)
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "registry: listening on %s\n", listener.Addr())
		go func() { served <- server.Serve(listener) }()
	}
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
		shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := server.Shutdown(shutdown); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}
}

func parseConfig(path string) (*configuration.Configuration, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cfg, err := configuration.Parse(f)
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", path, err)
	}
	return cfg, nil
}
