# Gantry: everything a developer or CI runs. `make test` is the whole gate; `make demo` shows
# what there is to see. Tools that are missing are built into $(GANTRY_CACHE), a cache beside
# the repository that survives fresh clones.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

GANTRY_CACHE ?= $(HOME)/.cache/gantry
CARGO ?= cargo
GO ?= go

HELM3_VERSION := v3.22.0
HELM4_VERSION := v4.3.1
HELM3 := $(GANTRY_CACHE)/tools/helm-$(HELM3_VERSION)/helm
HELM4 := $(GANTRY_CACHE)/tools/helm-$(HELM4_VERSION)/helm

export GANTRY_CACHE HELM3 HELM4 CARGO

.PHONY: help
help: ## List the targets.
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

# ---- tools -----------------------------------------------------------------------------------

.PHONY: tools
tools: $(HELM3) $(HELM4) ## Build the pinned Helm 3 and Helm 4 from their Go modules (cached).

$(HELM3):
	@echo "building helm $(HELM3_VERSION) from its Go module into $(@D)"
	@start=$$(date +%s); GOBIN=$(@D) GOFLAGS=-trimpath $(GO) install -ldflags='-s -w -X helm.sh/helm/v3/internal/version.version=$(HELM3_VERSION)' helm.sh/helm/v3/cmd/helm@$(HELM3_VERSION); \
	  echo "helm $(HELM3_VERSION) built in $$(( $$(date +%s) - start )) s"

$(HELM4):
	@echo "building helm $(HELM4_VERSION) from its Go module into $(@D)"
	@start=$$(date +%s); GOBIN=$(@D) GOFLAGS=-trimpath $(GO) install -ldflags='-s -w -X helm.sh/helm/v4/internal/version.version=$(HELM4_VERSION)' helm.sh/helm/v4/cmd/helm@$(HELM4_VERSION); \
	  echo "helm $(HELM4_VERSION) built in $$(( $$(date +%s) - start )) s"

# ---- checks ----------------------------------------------------------------------------------

.PHONY: fmt-check
fmt-check: ## Fail if any Rust file is not formatted.
	$(CARGO) fmt --all -- --check

.PHONY: clippy
clippy: ## Lint all Rust code; warnings are errors.
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: unit
unit: ## Unit and in-process integration tests (no cluster needed).
	$(CARGO) test --workspace --exclude gantry-e2e

.PHONY: generate
generate: ## Regenerate crds/*.yaml, the charts' copies and every operator chart's values.schema.json.
	$(CARGO) xtask generate

.PHONY: crds
crds: generate ## The same as `make generate`.

.PHONY: generate-check
generate-check: ## Fail if a generated file (CRDs, chart values schemas) is stale.
	$(CARGO) xtask generate --check

.PHONY: charts
charts: tools ## Lint, render and check every chart with Helm 3 and Helm 4.
	$(CARGO) xtask charts --helm $(HELM3) --helm $(HELM4)

.PHONY: check
check: fmt-check clippy generate-check charts ## Static checks: format, lint, generated files, charts.

.PHONY: test
test: check unit test-e2e ## Everything: static checks, unit tests and the end-to-end tests.
	@echo "make test: all checks passed"

.PHONY: demo
demo: tools k8s-bins ## A local cluster with the gray-upgrade operator, upgrading 25 instances batch by batch.
	@GANTRY_CACHE=$(GANTRY_CACHE) CARGO=$(CARGO) e2e/demo.sh

# ---- local clusters and end-to-end tests -----------------------------------------------------

include e2e/e2e.mk

# ---- images ----------------------------------------------------------------------------------

.PHONY: image
image: ## Print the command that builds an operator image (BINARY=gantry-noop PACKAGE=gantry-kit).
	@echo "docker build -f Dockerfile --build-arg PACKAGE=$(or $(PACKAGE),gantry-kit) --build-arg BINARY=$(or $(BINARY),gantry-noop) -t $(or $(BINARY),gantry-noop):dev ."

.PHONY: clean
clean: ## Remove build outputs (not the tool cache).
	$(CARGO) clean
