import Foundation
import KeyholeLauncher
import KeyholePolicy
import Testing
import Yams

@Suite("Guest configuration")
struct GuestConfigurationTests {
    static let realValue = "guest-config-real-0006"

    static func layer(command: [String]? = ["curl", "-H", "it's $X"]) throws -> GuestLayer {
        let policy = try PolicyLoader().load(
            yaml: """
                version: 1
                name: cfg
                secrets:
                  - env: TOKEN
                    value: "\(realValue)"
                    allow_hosts: [api.example.test]
                guest:
                  env: { MODE: "a 'quoted' value" }
                """, file: "cfg.yaml")
        return GuestLayer(
            policy: policy,
            network: .init(address: InterfaceAddress("10.213.0.2/30")!, gateway: IPAddress("10.213.0.1")!, resolver: IPAddress("198.51.100.53")!),
            caCertificatePEM: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", command: command)
    }

    /// The archive's files, as `cpio -t` and `cpio -i --to-stdout` read them.
    func extract(_ archive: [UInt8], _ file: String) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("layer-\(getpid())-\(UUID().uuidString).cpio").path
        try Data(archive).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", "cpio -i --quiet --to-stdout '\(file)' < '\(path)'"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self)
    }

    @Test func theLayerCarriesPlaceholdersTrustAndTheCommandButNoRealValue() throws {
        let layer = try Self.layer()
        let archive = layer.archive(withInit: true)
        let bytes = String(decoding: archive, as: UTF8.self)
        #expect(!bytes.contains(Self.realValue))
        let env = try extract(archive, "keyhole/env")
        #expect(env.contains("export TOKEN='$MSB_TOKEN'\n"))
        #expect(env.contains("export MODE='a '\\''quoted'\\'' value'\n"))
        #expect(env.contains("export SSL_CERT_FILE='/etc/ssl/certs/ca-certificates.crt'"))
        #expect(env.contains("export NODE_EXTRA_CA_CERTS='/keyhole/ca.pem'"))
        #expect(try extract(archive, "keyhole/command") == "exec 'curl' '-H' 'it'\\''s $X'\n")
        #expect(try extract(archive, "keyhole/net").contains("KH_ADDR=10.213.0.2/30\nKH_GW=10.213.0.1\nKH_DNS=198.51.100.53\n"))
        #expect(try extract(archive, "init").hasPrefix("#!/bin/busybox sh"))
        #expect(try extract(layer.archive(withInit: false), "init").isEmpty)
    }

    @Test func theCloudInitSeedSaysTheSameInYAML() throws {
        let seed = CloudInitSeed(layer: try Self.layer(), mac: "52:4b:00:11:22:33")
        #expect(seed.userData.hasPrefix("#cloud-config\n"))
        #expect(!seed.userData.contains(Self.realValue))
        let user = try #require(try Yams.load(yaml: seed.userData) as? [String: Any])
        let files = try #require(user["write_files"] as? [[String: Any]])
        #expect((files.first?["content"] as? String)?.contains("export TOKEN='$MSB_TOKEN'") == true)
        #expect(((user["ca_certs"] as? [String: Any])?["trusted"] as? [String])?.first?.contains("BEGIN CERTIFICATE") == true)
        let runcmd = try #require((user["runcmd"] as? [[String]])?.first)
        #expect(runcmd.prefix(2) == ["sh", "-c"])
        #expect(runcmd[2].contains("'curl' '-H' 'it'\\''s $X' </dev/null >/dev/hvc0 2>/dev/hvc1; echo \"KEYHOLE-EXIT $?\""))
        let network = try #require(try Yams.load(yaml: seed.networkConfig) as? [String: Any])
        let nic = try #require((network["ethernets"] as? [String: Any])?["keyhole0"] as? [String: Any])
        #expect((nic["match"] as? [String: Any])?["macaddress"] as? String == "52:4b:00:11:22:33")
        #expect(nic["addresses"] as? [String] == ["10.213.0.2/30"])
        let meta = try #require(try Yams.load(yaml: seed.metaData) as? [String: Any])
        #expect(meta["local-hostname"] as? String == "cfg")
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/genisoimage"), "needs genisoimage"))
    func theSeedVolumeIsLabelledCidata() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("seed-\(getpid()).iso").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try CloudInitSeed(layer: try Self.layer(command: nil), mac: "52:4b:00:11:22:33").write(to: path)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/isoinfo")
        process.arguments = ["-d", "-i", path]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let info = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(info.contains("Volume id: cidata"), "\(info)")
    }
}
