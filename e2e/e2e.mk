# Local Kubernetes for the end-to-end tests and the demo. Included by the top-level Makefile,
# which provides GANTRY_CACHE, CARGO, GO and HELM3 (and the $(HELM3) target).
#
#   make k8s-bins                  build (or find cached) etcd, kube-apiserver, controller-manager,
#                                  scheduler, kubectl (one multi-call binary) and kwok
#   make node-bins                 build (or find cached) what a real node runs: containerd, runc,
#                                  the registry, crane, pause; install Debian's CNI plugins and
#                                  iptables when missing (root)
#   make cluster-up [CLUSTER=name] [NODES=n] [CAPACITY="nvidia.com/gpu=8 ..."] [REAL_NODE=1]
#   make cluster-down [CLUSTER=name]   (without CLUSTER: every cluster)
#   make test-e2e [KEEP_CLUSTER=1] [E2E_TEST_ARGS="-- kit::"]
#                                  the end-to-end tests, on cluster "e2e" (and "e2e-remote" for
#                                  the tests that span two clusters)
#   make demo-cluster                  a cluster "gantry" and how to point kubectl at it

GANTRY_CACHE ?= $(HOME)/.cache/gantry
CARGO ?= cargo
GO ?= go

E2E_BUILD := e2e/cluster/build.sh
E2E_NODE_BUILD := e2e/node/build.sh
E2E_CLUSTER_CLI = $(CARGO) run --quiet -p gantry-e2e --bin gantry-cluster --
E2E_NODES_ARGS = --nodes $(or $(NODES),3) $(foreach c,$(CAPACITY),--capacity $(c)) $(if $(REAL_NODE),--real-node)
E2E_BIN_ENV = GANTRY_K8S_BIN_DIR=$$(GANTRY_CACHE=$(GANTRY_CACHE) GO=$(GO) $(E2E_BUILD)) \
  GANTRY_NODE_BIN_DIR=$$(GANTRY_CACHE=$(GANTRY_CACHE) GO=$(GO) $(E2E_NODE_BUILD) --print-dir)

.PHONY: k8s-bins
k8s-bins: ## Build the control plane and kwok from their Go modules (cached; rebuilt only when pins change).
	@GANTRY_CACHE=$(GANTRY_CACHE) GO=$(GO) $(E2E_BUILD) >/dev/null

.PHONY: node-bins
node-bins: ## Build what a real node runs (containerd, runc, registry, crane, pause; cached) and install Debian's CNI plugins and iptables.
	@GANTRY_CACHE=$(GANTRY_CACHE) GO=$(GO) $(E2E_NODE_BUILD) >/dev/null

.PHONY: cluster-up
cluster-up: k8s-bins $(if $(REAL_NODE),node-bins) ## Start local cluster $(CLUSTER) (default "gantry"; REAL_NODE=1 adds a real node); prints `export KUBECONFIG=...`.
	@$(E2E_BIN_ENV) $(E2E_CLUSTER_CLI) up --name $(or $(CLUSTER),gantry) $(E2E_NODES_ARGS)

.PHONY: cluster-down
cluster-down: ## Stop local cluster $(CLUSTER) and remove its state (all clusters without CLUSTER).
	@$(E2E_CLUSTER_CLI) down $(if $(CLUSTER),--name $(CLUSTER),--all)

.PHONY: cluster-list
cluster-list: ## List local clusters and their health.
	@$(E2E_CLUSTER_CLI) list

.PHONY: demo-cluster
demo-cluster: k8s-bins ## Start the demo cluster and print how to use kubectl with it.
	@bins=$$(GANTRY_CACHE=$(GANTRY_CACHE) GO=$(GO) $(E2E_BUILD)); \
	  GANTRY_K8S_BIN_DIR=$$bins $(E2E_CLUSTER_CLI) up --name $(or $(CLUSTER),gantry) $(E2E_NODES_ARGS); \
	  echo "# kubectl $$($$bins/kubectl version --client | head -1 | awk '{print $$3}') matching the server:"; \
	  echo "export PATH=$$bins:\$$PATH"; \
	  echo "# then: kubectl get nodes; stop it with: make cluster-down CLUSTER=$(or $(CLUSTER),gantry)"

.PHONY: test-e2e
test-e2e: k8s-bins node-bins ## End-to-end tests against local clusters ("e2e", and others some tests start; stopped afterwards unless KEEP_CLUSTER=1).
	$(if $(HELM3),@$(MAKE) $(HELM3))
	$(if $(HELM4),@$(MAKE) $(HELM4))
	@start=$$(date +%s); status=0; \
	  $(E2E_BIN_ENV) HELM3=$(HELM3) HELM4=$(HELM4) GANTRY_E2E_CLUSTER=e2e \
	    $(CARGO) test --no-fail-fast -p gantry-e2e $(E2E_TEST_ARGS) || status=$$?; \
	  echo "test-e2e: $$(( $$(date +%s) - start )) s"; \
	  if [ -z "$(KEEP_CLUSTER)" ]; then $(E2E_CLUSTER_CLI) down --name e2e; $(E2E_CLUSTER_CLI) down --name e2e-remote; $(E2E_CLUSTER_CLI) down --name e2e-node; fi; \
	  exit $$status

.PHONY: bench-cluster
bench-cluster: k8s-bins ## Control-plane memory at idle and with PODS pods (1000) on NODES kwok nodes (100).
	@GANTRY_K8S_BIN_DIR=$$(GANTRY_CACHE=$(GANTRY_CACHE) GO=$(GO) $(E2E_BUILD)) \
	  $(CARGO) run --quiet -p gantry-e2e --bin gantry-cluster -- bench --nodes $(or $(NODES),100) --pods $(or $(PODS),1000)
