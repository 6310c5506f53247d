// swift-tools-version: 6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

let package = Package(
    name: "keyhole",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "keyhole", targets: ["KeyholeCLI"]),
        // The Swift SDK: Sandbox.builder(…).secret { … }.create(), Appliance.builder(interface:).
        .library(name: "Keyhole", targets: ["Keyhole"]),
        .library(name: "KeyholeEngine", targets: ["KeyholeEngine"]),
        .library(name: "KeyholePolicy", targets: ["KeyholePolicy"]),
        .library(name: "KeyholeTLS", targets: ["KeyholeTLS"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.30.0"),
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.30.0"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.10.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.0"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.0.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.0.0"),
        .package(url: "https://github.com/adam-fowler/compress-nio.git", from: "1.5.0"),
    ],
    targets: [
        // Pure: policy model, YAML, validation, secret sources. No network I/O.
        .target(
            name: "KeyholePolicy",
            dependencies: [.product(name: "Yams", package: "Yams")],
            swiftSettings: strict
        ),
        // SIMD byte-set scans (AVX2 / SSE2, chosen at run time) for the engine's hot loops.
        .target(name: "CKeyholeSIMD"),
        // Pure: bytes in, bytes out. NIOCore for ByteBuffer; CompressNIO (zlib) to read
        // gzip and deflate responses for masking.
        .target(
            name: "KeyholeEngine",
            dependencies: [
                "KeyholePolicy", "CKeyholeSIMD",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "CompressNIO", package: "compress-nio"),
            ],
            swiftSettings: strict
        ),
        .target(
            name: "KeyholeTLS",
            dependencies: [
                "KeyholePolicy",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ],
            swiftSettings: strict
        ),
        .target(
            name: "KeyholeProxy",
            dependencies: [
                "KeyholePolicy", "KeyholeEngine", "KeyholeTLS",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strict
        ),
        .systemLibrary(
            name: "CNetfilterQueue",
            pkgConfig: "libnetfilter_queue",
            providers: [.apt(["libnetfilter-queue-dev", "libmnl-dev"])]
        ),
        .target(
            name: "KeyholeNetfilter",
            dependencies: ["CNetfilterQueue", "KeyholePolicy"],
            swiftSettings: strict
        ),
        .target(
            name: "KeyholeLauncher",
            dependencies: ["KeyholePolicy", "KeyholeNetfilter", "KeyholeProxy", "KeyholeTLS"],
            swiftSettings: strict
        ),
        .target(
            name: "Keyhole",
            dependencies: [
                "KeyholePolicy", "KeyholeProxy", "KeyholeTLS", "KeyholeNetfilter", "KeyholeLauncher",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "KeyholeCLI",
            dependencies: [
                "KeyholePolicy", "KeyholeEngine", "KeyholeTLS", "KeyholeProxy",
                "KeyholeNetfilter", "KeyholeLauncher",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeyholePolicyTests",
            dependencies: ["KeyholePolicy"],
            exclude: ["Fixtures"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeyholeEngineTests",
            dependencies: ["KeyholeEngine", "KeyholePolicy", .product(name: "NIOCore", package: "swift-nio"), .product(name: "CompressNIO", package: "compress-nio")],
            exclude: ["Fixtures"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeyholeTLSTests",
            dependencies: [
                "KeyholeTLS",
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeyholeProxyTests",
            dependencies: ["KeyholeProxy", .product(name: "NIOEmbedded", package: "swift-nio")],
            swiftSettings: strict),
        .testTarget(name: "KeyholeNetfilterTests", dependencies: ["KeyholeNetfilter"], swiftSettings: strict),
        .testTarget(
            name: "KeyholeLauncherTests",
            dependencies: ["KeyholeLauncher", "KeyholePolicy", .product(name: "Yams", package: "Yams")],
            swiftSettings: strict),
        .testTarget(name: "KeyholeTests", dependencies: ["Keyhole", "KeyholeLauncher"], swiftSettings: strict),
        .testTarget(name: "KeyholeCLITests", dependencies: ["KeyholeCLI"], exclude: ["Fixtures"], swiftSettings: strict),
    ],
    swiftLanguageModes: [.v6]
)
