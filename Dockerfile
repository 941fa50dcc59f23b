# One image per operator binary: a static (musl) build in the first stage, copied alone into an
# empty distroless base that runs as an unprivileged user.
#   docker build --build-arg PACKAGE=gantry-kit --build-arg BINARY=gantry-noop -t gantry-noop .
FROM docker.io/library/rust:1.95-bookworm AS build
ARG PACKAGE
ARG BINARY
RUN rustup target add x86_64-unknown-linux-musl \
 && apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --locked --release --target x86_64-unknown-linux-musl --package "${PACKAGE}" --bin "${BINARY}" \
 && install -D "target/x86_64-unknown-linux-musl/release/${BINARY}" /out/operator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/operator /operator
USER 65532:65532
ENTRYPOINT ["/operator"]
