import Foundation
import KeyholeTLS
import Testing
import X509
import Crypto

@Suite("Sandbox CA")
struct SandboxCATests {
    func temporaryDirectory() -> String {
        let path = "/tmp/keyhole-ca-test-\(UUID().uuidString)"
        return path
    }

    func mode(_ path: String) -> UInt32 {
        var info = stat()
        stat(path, &info)
        return UInt32(info.st_mode) & 0o777
    }

    @Test func createsOnceThenReuses() throws {
        let dir = temporaryDirectory() + "/nested/state"
        defer { try? FileManager.default.removeItem(atPath: (dir as NSString).deletingLastPathComponent) }
        let first = try SandboxCA.loadOrCreate(stateDirectory: dir)
        #expect(first.created)
        #expect(mode(first.keyPath) == 0o600)
        #expect(mode(dir) == 0o700)
        let second = try SandboxCA.loadOrCreate(stateDirectory: dir)
        #expect(!second.created)
        #expect(second.certificate == first.certificate)
        #expect(second.fingerprint == first.fingerprint)
        #expect(second.privateKey.rawRepresentation == first.privateKey.rawRepresentation)
    }

    @Test func isAnECDSAP256CertificateAuthority() throws {
        let dir = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try SandboxCA.loadOrCreate(stateDirectory: dir)
        let cert = ca.certificate
        #expect(cert.signatureAlgorithm == .ecdsaWithSHA256)
        #expect(P256.Signing.PublicKey(cert.publicKey) != nil)
        let constraints = try #require(try cert.extensions.basicConstraints)
        #expect(constraints == .isCertificateAuthority(maxPathLength: 0))
        #expect(try cert.extensions.keyUsage?.keyCertSign == true)
        #expect(cert.issuer == cert.subject)
        #expect(cert.notValidBefore < Date())
        #expect(ca.certificatePEM.hasPrefix("-----BEGIN CERTIFICATE-----"))
        #expect(!ca.certificatePEM.contains("PRIVATE KEY"))
    }

    @Test func refusesAKeyReadableByOthers() throws {
        let dir = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try SandboxCA.loadOrCreate(stateDirectory: dir)
        chmod(ca.keyPath, 0o644)
        #expect {
            try SandboxCA.loadOrCreate(stateDirectory: dir)
        } throws: { error in
            "\(error)".contains("chmod 600") && "\(error)".contains("644")
        }
    }

    @Test func refusesAHalfCA() throws {
        let dir = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try SandboxCA.loadOrCreate(stateDirectory: dir)
        unlink(ca.keyPath)
        #expect {
            try SandboxCA.loadOrCreate(stateDirectory: dir)
        } throws: { error in
            "\(error)".contains("found \(ca.certificatePath) but not \(ca.keyPath)")
        }
        // The certificate was not replaced behind the user's back.
        #expect(FileManager.default.fileExists(atPath: ca.certificatePath))
    }

    @Test func loadWithoutInitSaysHowToCreate() {
        #expect {
            try SandboxCA.load(stateDirectory: "/tmp/keyhole-no-such-state-\(UUID().uuidString)")
        } throws: { error in
            "\(error)".contains("keyhole ca init")
        }
    }
}
