# One image with every LPS binary, used by the compose topologies:
#
#   docker build -t lps:latest .                    # runtime image (the default target)
#   docker build --target netem -t lps-netem:latest .   # tc sidecar for docker-compose-*netem.yml
#
# The default target compiles the workspace inside the image (about 10 minutes on 2 cores
# from nothing). The `prebuilt` target packages release binaries compiled on the host
# instead, into the same runtime layout; scripts/compose-test.sh uses it (seconds):
#
#   cargo build --release --locked --workspace --bins
#   mkdir -p target/lps-image && cp target/release/{ars-comp-1,ars-comp-2,rast-simulator,legacy-proxy-1,legacy-proxy-2,lps-edge,lps} target/lps-image/
#   docker build --target prebuilt -t lps:latest .
#
# (the host must have the runtime image's glibc or an older one: Debian bookworm builds
# for the default). Compose picks the target with LPS_TARGET=prebuilt.
#
# Base images are build arguments, so that a machine without a registry can use images
# of its own (scripts/compose-test.sh makes lps-offline/... ones): RUST_IMAGE for the
# build, RUNTIME_IMAGE for the runtime and the netem sidecar.
#
# Works with BuildKit and with the legacy builder (no RUN --mount): dependencies are cached
# in a layer of their own that is rebuilt only when a Cargo.toml or Cargo.lock changes. The
# legacy builder runs every stage above the target, so the cheap stages come first.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- runtime-base: the user, folders and settings of the runtime image, no binaries -----
FROM ${RUNTIME_IMAGE} AS runtime-base
LABEL org.opencontainers.image.title="lps"
# Non-root. UID/GID 1000 is the usual first user on a Linux host, so the bind-mounted
# logs folder is writable without a `user:` override in the common case; compose sets
# `user: ${LPS_UID}:${LPS_GID}` for the others (see docs/compose.adoc).
ARG LPS_UID=1000
ARG LPS_GID=1000
RUN groupadd --gid "${LPS_GID}" lps \
    && useradd --uid "${LPS_UID}" --gid lps --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin lps \
    && mkdir -p /app/logs \
    && chown -R lps:lps /app
WORKDIR /app
# Every service writes logs/<SERVICE_NAME>.log here; the simulator also its
# ars_simulation.log and ars_simulation.ledger.jsonl.
ENV LOG_DIR=/app/logs
USER lps
# The services listen on HTTP_PORT (8080; the simulator 1337). Each binary is its own
# health probe: `<binary> healthcheck [PATH]`.
EXPOSE 8080 1337
CMD ["lps", "--help"]

# --- prebuilt: the runtime with the host's release binaries from target/lps-image/ -------
# Cargo.lock is only there so that the COPY has a source when target/lps-image does not
# exist (the legacy builder runs this stage on the way to the default target too).
FROM runtime-base AS prebuilt
COPY Cargo.lock target/lps-image* /usr/local/bin/
USER root
RUN rm /usr/local/bin/Cargo.lock
USER lps

# --- netem: tc for the network-emulation sidecars (opt-in, needs NET_ADMIN) -------------
# A runtime image that has tc already (the lps-offline/... ones) needs no package index.
FROM ${RUNTIME_IMAGE} AS netem
LABEL org.opencontainers.image.title="lps-netem"
RUN if ! command -v tc >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends iproute2 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
CMD ["tc", "qdisc", "show"]

# --- plan: the workspace's manifests, with stub sources, and nothing else --------------
FROM ${RUST_IMAGE} AS plan
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY vendor vendor
# Every member's Cargo.toml, an empty lib.rs where the crate has a library and an empty
# main where it has a binary. Only this output reaches the build stage, so editing a .rs
# file leaves the dependency layer below cached.
RUN set -eu; \
    mkdir -p /plan; \
    cp Cargo.toml Cargo.lock /plan/; \
    cp -r vendor /plan/; \
    for manifest in crates/*/Cargo.toml; do \
        crate="${manifest%/Cargo.toml}"; \
        mkdir -p "/plan/$crate/src"; \
        cp "$manifest" "/plan/$crate/"; \
        if [ -f "$crate/src/lib.rs" ]; then : > "/plan/$crate/src/lib.rs"; fi; \
        if [ -f "$crate/src/main.rs" ]; then echo 'fn main() {}' > "/plan/$crate/src/main.rs"; fi; \
    done

# --- build: dependencies first, then the workspace ---------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY --from=plan /plan/ ./
RUN cargo build --release --locked --workspace --bins
COPY Cargo.toml Cargo.lock ./
COPY crates crates
# lps embeds mosquitto/mosquitto.conf (include_str!).
COPY mosquitto mosquitto
# COPY keeps the sources' old modification times; make sure cargo sees them as newer
# than the stubs it just compiled.
RUN find crates -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && for bin in ars-comp-1 ars-comp-2 rast-simulator legacy-proxy-1 legacy-proxy-2 lps-edge lps; do \
           install -m 0755 "target/release/$bin" /out/; \
       done

# --- runtime: the services (last stage, so the default target) ---------------------------
FROM runtime-base AS runtime
COPY --from=build /out/ /usr/local/bin/
