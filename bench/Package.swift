// swift-tools-version: 6.1
// Micro-benchmarks for Keyhole, kept out of the main package so its build stays light.
// Run: cd bench && swift package benchmark   (or bench/run for the whole comparison)
import PackageDescription

let package = Package(
    name: "keyhole-bench",
    platforms: [.macOS(.v14)],
    dependencies: [
        // A fixed name for the main package, whatever the checkout directory is called.
        .package(path: "deps/keyhole"),
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.30.0", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.80.0"),
    ],
    targets: [
        .executableTarget(
            name: "EngineBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "KeyholeEngine", package: "keyhole"),
                .product(name: "KeyholePolicy", package: "keyhole"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            path: "Benchmarks/EngineBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        .executableTarget(
            name: "TLSBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "KeyholeTLS", package: "keyhole"),
            ],
            path: "Benchmarks/TLSBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        .executableTarget(
            name: "EngineProfile",
            dependencies: [
                .product(name: "KeyholeEngine", package: "keyhole"),
                .product(name: "KeyholePolicy", package: "keyhole"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
    ]
)
