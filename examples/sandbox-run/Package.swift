// swift-tools-version: 6.1
// An example of the Keyhole SDK: a small CLI that starts a sandbox with one secret, runs a
// command in it and exits with the command's status.
import PackageDescription

let package = Package(
    name: "sandbox-run",
    platforms: [.macOS(.v14)],
    dependencies: [.package(name: "keyhole", path: "../..")],
    targets: [
        .executableTarget(
            name: "sandbox-run",
            dependencies: [.product(name: "Keyhole", package: "keyhole")],
            swiftSettings: [.enableUpcomingFeature("ExistentialAny")]
        )
    ],
    swiftLanguageModes: [.v6]
)
