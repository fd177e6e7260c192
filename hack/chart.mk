# Helm chart, container image and kind targets; included by the Makefile
# (`-include hack/chart.mk`). Owned with charts/kubelock.

PYTHON ?= python3
# helm-sdkpy: the Helm Go SDK as a Python wheel (cffi). It declares Python >= 3.12 but
# works on 3.11, hence --ignore-requires-python. Pinned: hack/helm.py uses its API.
HELM_SDKPY_VERSION ?= 0.1.32

.PHONY: helm-sdk chart-crds chart-lint chart-install e2e-kind image image-load image-docker dev-node

helm-sdk: ## Install helm-sdkpy and PyYAML for hack/helm.py if missing.
	@if ! $(PYTHON) -c 'import helm_sdkpy, yaml' 2>/dev/null; then \
	  echo "installing helm-sdkpy==$(HELM_SDKPY_VERSION) and pyyaml for $(PYTHON) (pip)" >&2; \
	  $(PYTHON) -m pip --version >/dev/null 2>&1 || \
	    { echo "no pip for $(PYTHON): install python3-pip, or set PYTHON=" >&2; exit 1; }; \
	  pip_install() { $(PYTHON) -m pip install --quiet --disable-pip-version-check \
	    --ignore-requires-python "$$@" "helm-sdkpy==$(HELM_SDKPY_VERSION)" pyyaml; }; \
	  pip_install || pip_install --break-system-packages; \
	  $(PYTHON) -c 'import helm_sdkpy, yaml'; \
	fi

chart-crds: ## Regenerate the chart's CRDs (charts/kubelock/files/crds.yaml) from the API types.
	$(CARGO) run --quiet --bin kubelock -- crd > charts/kubelock/files/crds.yaml.tmp
	mv charts/kubelock/files/crds.yaml.tmp charts/kubelock/files/crds.yaml

# `make crds` refreshes the chart's copy too (a test fails when the two differ).
crds: chart-crds

# The chart tests (tests/e2e/chart.rs) drive Helm through hack/helm.py.
test: helm-sdk

chart-lint: helm-sdk ## helm lint of charts/kubelock.
	$(PYTHON) hack/helm.py lint charts/kubelock

chart-install: helm-sdk ## helm install the chart into $KUBECONFIG (release kubelock, namespace kubelock-system).
	$(PYTHON) hack/helm.py install kubelock charts/kubelock -n kubelock-system --create-namespace $(HELM_ARGS)

image: ## Build the images without Docker: OCI tarballs in target/image (kubelock:dev, kubelock-test:dev).
	hack/image.sh build

image-load: ## Import those images into the running local node (kubelock dev --node).
	hack/image.sh load

image-docker: ## Build the container image with Docker: IMAGE=kubelock:dev.
	docker build -t $(or $(IMAGE),kubelock:dev) .

dev-node: image ## kubelock dev with a local node (root), both images loaded into it.
	$(CARGO) build --bin kubelock
	target/debug/kubelock dev --node $(DEV_ARGS)

e2e-kind: helm-sdk ## kind cluster + image + chart + the e2e suite (needs Docker and kind).
	hack/kind-e2e.sh
