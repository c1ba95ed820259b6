# Multi-stage build: compile with the Rust toolchain, run on distroless (no shell, no
# package manager, non-root). TLS is rustls with built-in web PKI roots, so the runtime
# image needs no OpenSSL and no CA bundle of its own.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# The workspace's other member: cargo reads its manifest, but without the `demo` feature
# (on by default) the image's binary does not contain it: no stand-in identity provider.
COPY testkit ./testkit
RUN cargo build --release --locked --no-default-features --bin dynamics-gateway

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/dynamics-gateway /usr/local/bin/dynamics-gateway
COPY config.yaml /etc/dynamics-gateway/config.yaml
ENV DYNAMICS_GATEWAY_CONFIG=/etc/dynamics-gateway/config.yaml
USER nonroot:nonroot
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/dynamics-gateway", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/dynamics-gateway"]
CMD ["run", "--log-format", "json"]
