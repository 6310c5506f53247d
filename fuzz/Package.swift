// swift-tools-version: 6.1
// libFuzzer entry point for the substitution engine, kept out of the main package because
// it only links with -sanitize=fuzzer. Run: make fuzz (or scripts/fuzz.sh SECONDS).
import PackageDescription

let package = Package(
    name: "keyhole-fuzz",
    dependencies: [
        .package(path: "deps/keyhole"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.80.0"),
    ],
    targets: [
        .target(name: "CFuzzerDriver"),
        .executableTarget(
            name: "RewriterFuzzer",
            dependencies: [
                "CFuzzerDriver",
                .product(name: "KeyholeEngine", package: "keyhole"),
                .product(name: "KeyholePolicy", package: "keyhole"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        )
    ]
)
