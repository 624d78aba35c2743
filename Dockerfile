# One image with every LPS binary, used by the compose topologies:
#
#   docker build -t lps:latest .                    # runtime image (the default target)
#   docker build --target netem -t lps-netem:latest .   # tc sidecar for docker-compose-*netem.yml
#
# Works with BuildKit and with the legacy builder (no RUN --mount): dependencies are cached
# in a layer of their own that is rebuilt only when a Cargo.toml or Cargo.lock changes.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- plan: the workspace's manifests, with stub sources, and nothing else --------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS plan
WORKDIR /src
COPY . .
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
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
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

# --- netem: tc for the network-emulation sidecars (opt-in, needs NET_ADMIN) -------------
FROM debian:${DEBIAN_RELEASE}-slim AS netem
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 \
    && rm -rf /var/lib/apt/lists/*
CMD ["tc", "qdisc", "show"]

# --- runtime: the services (last stage, so the default target) ---------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
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
COPY --from=build /out/ /usr/local/bin/
WORKDIR /app
# Every service writes logs/<SERVICE_NAME>.log here; the simulator also its
# ars_simulation.log and ars_simulation.ledger.jsonl.
ENV LOG_DIR=/app/logs
USER lps
# The services listen on HTTP_PORT (8080; the simulator 1337). Each binary is its own
# health probe: `<binary> healthcheck [PATH]`.
EXPOSE 8080 1337
CMD ["lps", "--help"]
