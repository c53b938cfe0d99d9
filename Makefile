# kubekms: see README.md. Every target installs what it needs on a fresh
# Debian machine with Go (apt packages as root; binaries built from the Go
# module proxy are cached in $(KUBEKMS_CACHE), never in the repo).

SHELL := bash
GO ?= go
export KUBEKMS_CACHE ?= $(HOME)/.cache/kubekms
BIN := bin/kubekms
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Packages with concurrency run again under the race detector.
RACE_PKGS := ./hierarchy/... ./plugin/... ./keyservice/... ./envelope/ ./migrate/ ./snapshot/ ./inventory/ ./cmd/kubekms/
FUZZTIME ?= 10s

.PHONY: all build run deps vault test unit lint e2e e2e-revocation e2e-vault e2e-ha bench bench-floor bench-scale fuzz image clean manifests image-test static-pod-test release

all: build

build:
	$(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/kubekms

## run: build and start the plugin on its embedded default key service (softkey).
run: build
	./$(BIN) serve --log-format text

## deps: install the real parts the unit tests use (SoftHSM2, swtpm + tpm2-tools, local-kms, etcd, Vault, promtool, systemd tools, strace).
deps: vault
	hack/install-softhsm.sh
	hack/install-swtpm.sh
	hack/install-local-kms.sh
	hack/cluster-bins.sh etcd
	hack/install-deploy-tools.sh
	hack/install-hostile-tools.sh

## vault: build HashiCorp Vault into $(KUBEKMS_CACHE)/bin (~8 min the first time; VAULT_BIN=... links a prebuilt one).
vault:
	hack/vault-bin.sh

## test: install the test dependencies, then lint and run every unit, real-part and interop test.
test: deps lint unit

unit:
	KUBEKMS_REQUIRE_REAL=1 $(GO) test -count=1 -timeout 20m ./...
	KUBEKMS_REQUIRE_REAL=1 $(GO) test -count=1 -race -timeout 20m $(RACE_PKGS)

lint:
	CGO_ENABLED=0 $(GO) build -o /dev/null ./cmd/kubekms
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	$(GO) vet -tags e2e ./test/e2e/...
	$(GO) run $(STATICCHECK) -tags e2e ./test/e2e/...
	$(GO) vet -tags image ./test/image/
	$(GO) run $(STATICCHECK) -tags image ./test/image/

# The HA suite (three apiservers, three plugins, local-kms), the one-node softkey rotation and the recovery test: make e2e-ha.
E2E_HA_TESTS := TestHA|TestRecoveryEncryptionConfig|TestRotateSoftkeyOneNode

## e2e: the real-cluster suite (kube-apiserver + etcd built from the Go module proxy; ~20 min the first time).
## E2E_RUN / E2E_SKIP select tests (go test -run / -skip); independent clusters run in parallel.
E2E_RUN ?= .
E2E_SKIP ?= ^$$
e2e: vault
	hack/cluster-bins.sh
	KUBEKMS_REQUIRE_REAL=1 $(GO) test -tags e2e -count=1 -v -timeout 40m -parallel 8 -run '$(E2E_RUN)' -skip '$(E2E_SKIP)' ./test/e2e/...

## e2e-revocation: revocation, re-enable and outages against the real kube-apiserver (softkey, AWS KMS
## via local-kms, PKCS#11 via SoftHSM2, TPM via swtpm); ~6 min: each scenario waits out the apiserver's 3-minute write TTL.
e2e-revocation: deps
	$(MAKE) e2e E2E_RUN=TestRevocation

## e2e-vault: a real Vault with the real kube-apiserver: cert-auth plugin through rotation, Vault restart and seal,
## cold restart; Vault's kubernetes auth against the apiserver's TokenReview (~4 min; Vault's revocation cases
## are in e2e-revocation).
e2e-vault: deps
	$(MAKE) e2e E2E_RUN=TestVault

## e2e-ha: a control plane of three (3-member etcd, 3 kube-apiservers, 3 plugins on one AWS KMS key in
## local-kms): rotation and migration per node, guided rotation, kills under load; a guided softkey
## rotation on one node; and recovery with the apiserver's EncryptionConfiguration from a real etcd
## snapshot. 3-4.5 min once the binaries exist (2 shared cores); needs root (network and UTS namespaces).
e2e-ha:
	hack/install-local-kms.sh
	$(MAKE) e2e E2E_RUN='$(E2E_HA_TESTS)'

## bench: the gRPC benchmarks against a no-op KMS server on the same kind of socket.
bench: deps
	$(GO) test -run '^$$' -bench . -benchtime 3s -count 1 ./bench/

## bench-floor: the built kubekms serve (default flags) against the no-op plugin (bench/noop), each its own
## process on a unix socket, interleaved rounds, 16 callers (~3 min; docs/performance.md section 1).
FLOOR_ARGS ?= -rounds 6 -duration 5s
bench-floor:
	$(GO) run ./bench/floor $(FLOOR_ARGS)

## bench-scale: opt-in, not in CI. Cold start at 100,000 Secrets against identity, aescbc and the no-op plugin,
## then inventory, decrypt and migrate (vs kubectl get | kubectl replace) on 100,000 Secrets of a real
## cluster (~45 min on 2 cores; docs/performance.md sections 4 and 5).
SCALE_N ?= 100000
bench-scale:
	hack/cluster-bins.sh
	hack/cluster-bins.sh kubectl
	KUBEKMS_REQUIRE_REAL=1 $(GO) test -tags e2e -count=1 -v -timeout 90m -run 'TestColdStartEconomics$$' ./test/e2e/ \
		-args -e2e.secrets=$(SCALE_N) -e2e.coldstart.restarts=3
	KUBEKMS_REQUIRE_REAL=1 $(GO) test -tags e2e -count=1 -v -timeout 120m -run 'TestScaleTools$$' ./test/e2e/ \
		-args -e2e.scale=$(SCALE_N)

## fuzz: run every fuzz target for FUZZTIME.
fuzz:
	hack/fuzz.sh $(FUZZTIME)

IMAGE ?= localhost/kubekms:$(VERSION)
## image: build the container image from the Containerfile with podman (hack/install-podman.sh
## installs and configures it); without a reachable registry the base images are made locally.
image:
	IMAGE=$(IMAGE) VERSION=$(VERSION) hack/image.sh

IMAGE_TEST = KUBEKMS_IMAGE=$(IMAGE) KUBEKMS_REQUIRE_REAL=1 $(GO) test -tags image -count=1 -v -timeout 15m ./test/image/
## image-test: run the image (built first: `make image`) as the static pod's uid with --network none,
## and the conformance checks against its socket from the host.
image-test: image
	$(IMAGE_TEST) -run 'TestImage'

## static-pod-test: run the rendered static pod with `podman kube play` (image built first) and check
## what it promises: uid, read-only root, no capabilities, the socket, the probes, conformance.
static-pod-test: image
	hack/install-deploy-tools.sh
	$(IMAGE_TEST) -run 'TestStaticPod'

## release: static and cgo binaries for linux/amd64 and arm64, SBOMs, the image as an OCI archive,
## SHA256SUMS, in dist/.
release:
	VERSION=$(VERSION) IMAGE=$(IMAGE) hack/release.sh

clean:
	rm -rf bin dist

## manifests: render deploy/ from manifests/templates with the defaults (`kubekms manifests`).
manifests:
	$(GO) run ./cmd/kubekms manifests --out deploy
