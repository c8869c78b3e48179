# ferry: the two commands the README names are `make demo` and `make test`.
# Everything they need (Debian packages, Go modules, the test guest, the
# Linux guest) is installed or built from here.

GO        ?= go
STATICCHECK_VERSION := v0.8.2
APT_PACKAGES := gcc make libc6-dev linux-libc-dev qemu-system-x86 iproute2 acpica-tools
BIN       := bin

.PHONY: all ferry guest linux-guest lab-image lab setup deps test lint demo clean

all: ferry guest

# Debian packages: installed only when missing, so repeated runs are quick.
deps:
	@scripts/install-deps.sh $(APT_PACKAGES)

# Static (CGO_ENABLED=0): the same binary runs on this machine and inside
# the lab's emulated hosts, which have no C library.
ferry:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ferry ./cmd/ferry

guest:
	@$(MAKE) -s -C guest OUT=$(CURDIR)/build/guest
	@mkdir -p $(BIN)
	@cp build/guest/ferry-guest.elf $(BIN)/ferry-guest.elf

linux-guest:
	@scripts/linux-guest.sh build/linux

# The lab's emulated hosts (docs/lab.md): Debian's kernel with kvm-amd,
# busybox, tc, an init. Cached; rebuilt only when its inputs change.
lab-image: linux-guest
	@scripts/lab-host.sh build/lab

setup: deps all

lint:
	@test -z "$$(gofmt -l cmd internal scripts)" || { echo "gofmt needed:"; gofmt -l cmd internal scripts; exit 1; }
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

# The test command: set-up, lint, then every test with a count of the KVM tests.
test: setup linux-guest lab-image lint
	@scripts/test.sh

# The main job: two daemons on this machine, a live migration between them.
demo: setup
	@scripts/demo.sh

# A Linux guest moved between two emulated hosts, shown (docs/lab.md).
lab: setup lab-image
	@$(BIN)/ferry lab run

clean:
	rm -rf $(BIN) build
