public import Crypto
public import Foundation
import SwiftASN1
public import X509

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The error type of `KeyholeTLS`. Messages name the file at fault and what to do;
/// they never contain key material.
public enum TLSError: Error, Sendable, CustomStringConvertible {
    case stateDirectory(path: String, reason: String)
    case insecureKeyPermissions(path: String, mode: UInt32)
    case keyNotOwned(path: String)
    case incompleteCA(present: String, missing: String)
    case invalidCA(path: String, reason: String)
    case keyDoesNotMatchCertificate(keyPath: String, certificatePath: String)
    case io(path: String, reason: String)
    case forging(reason: String)

    public var description: String {
        switch self {
        case .stateDirectory(let path, let reason):
            return "state directory \(path): \(reason)"
        case .insecureKeyPermissions(let path, let mode):
            return "CA key \(path) has mode \(String(mode, radix: 8)); it must be readable by its owner only (run: chmod 600 \(path))"
        case .keyNotOwned(let path):
            return "CA key \(path) is owned by another user; refusing to use it"
        case .incompleteCA(let present, let missing):
            return "found \(present) but not \(missing); restore it, or remove \(present) to create a new CA"
        case .invalidCA(let path, let reason):
            return "cannot use \(path): \(reason)"
        case .keyDoesNotMatchCertificate(let keyPath, let certificatePath):
            return "CA key \(keyPath) does not belong to certificate \(certificatePath)"
        case .io(let path, let reason):
            return "\(path): \(reason)"
        case .forging(let reason):
            return "cannot forge a certificate: \(reason)"
        }
    }
}

/// The sandbox certificate authority: an ECDSA P-256 key and a self-signed CA certificate,
/// created once in the state directory and reused by every later run.
///
/// Files: `ca.pem` (certificate, 0644) and `ca.key` (PKCS#8 private key, 0600). The key is
/// refused when its permissions are looser than 0600 or another user owns it.
public struct SandboxCA: Sendable {
    public static let defaultStateDirectory = "/var/lib/keyhole"
    public static let certificateFileName = "ca.pem"
    public static let keyFileName = "ca.key"

    public let certificate: Certificate
    public let privateKey: P256.Signing.PrivateKey
    public let certificatePath: String
    public let keyPath: String
    /// True when this call created the CA (false: loaded from disk).
    public let created: Bool

    public var certificatePEM: String {
        // Serialising a certificate we parsed or built ourselves cannot fail.
        (try? certificate.serializeAsPEM().pemString) ?? ""
    }

    /// SHA-256 over the DER certificate, as `AA:BB:…`, for users to compare by eye.
    public var fingerprint: String {
        var serializer = DER.Serializer()
        guard (try? serializer.serialize(certificate)) != nil else { return "?" }
        return SHA256.hash(data: serializer.serializedBytes).map { String(format: "%02X", $0) }.joined(separator: ":")
    }

    /// Loads the CA from `stateDirectory`, creating it (and the directory, mode 0700) when absent.
    public static func loadOrCreate(stateDirectory: String = defaultStateDirectory, now: Date = Date()) throws(TLSError) -> SandboxCA {
        try ensureDirectory(stateDirectory)
        let lock = try StateLock(directory: stateDirectory)
        defer { lock.release() }
        let certPath = stateDirectory + "/" + certificateFileName
        let keyPath = stateDirectory + "/" + keyFileName
        switch (exists(certPath), exists(keyPath)) {
        case (true, true):
            return try load(certificatePath: certPath, keyPath: keyPath)
        case (true, false):
            throw .incompleteCA(present: certPath, missing: keyPath)
        case (false, true):
            throw .incompleteCA(present: keyPath, missing: certPath)
        case (false, false):
            return try create(certificatePath: certPath, keyPath: keyPath, now: now)
        }
    }

    /// Loads an existing CA; never creates one.
    public static func load(stateDirectory: String = defaultStateDirectory) throws(TLSError) -> SandboxCA {
        let certPath = stateDirectory + "/" + certificateFileName
        let keyPath = stateDirectory + "/" + keyFileName
        guard exists(certPath) else {
            throw .invalidCA(path: certPath, reason: "no CA here yet (run: keyhole ca init --state-dir \(stateDirectory))")
        }
        return try load(certificatePath: certPath, keyPath: keyPath)
    }

    static func load(certificatePath: String, keyPath: String) throws(TLSError) -> SandboxCA {
        try checkKeyFile(keyPath)
        let certificate: Certificate
        do {
            certificate = try Certificate(pemEncoded: try readText(certificatePath))
        } catch let error as TLSError {
            throw error
        } catch {
            throw .invalidCA(path: certificatePath, reason: "not a PEM certificate")
        }
        let key: P256.Signing.PrivateKey
        do {
            key = try P256.Signing.PrivateKey(pemRepresentation: try readText(keyPath))
        } catch let error as TLSError {
            throw error
        } catch {
            throw .invalidCA(path: keyPath, reason: "not a PEM ECDSA P-256 private key")
        }
        guard certificate.publicKey == Certificate.PublicKey(key.publicKey) else {
            throw .keyDoesNotMatchCertificate(keyPath: keyPath, certificatePath: certificatePath)
        }
        return SandboxCA(certificate: certificate, privateKey: key, certificatePath: certificatePath, keyPath: keyPath, created: false)
    }

    static func create(certificatePath: String, keyPath: String, now: Date) throws(TLSError) -> SandboxCA {
        let key = P256.Signing.PrivateKey()
        let certificate: Certificate
        do {
            var random = SystemRandomNumberGenerator()
            let tag = String(random.next() & 0xFFFF_FFFF, radix: 16)
            let name = try DistinguishedName {
                OrganizationName("Keyhole")
                CommonName("Keyhole sandbox CA \(tag)")
            }
            let publicKey = Certificate.PublicKey(key.publicKey)
            certificate = try Certificate(
                version: .v3,
                serialNumber: Certificate.SerialNumber(),
                publicKey: publicKey,
                notValidBefore: now.addingTimeInterval(-3600),
                notValidAfter: now.addingTimeInterval(10 * 365 * 86400),
                issuer: name,
                subject: name,
                signatureAlgorithm: .ecdsaWithSHA256,
                extensions: try Certificate.Extensions {
                    Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                    Critical(KeyUsage(digitalSignature: true, keyCertSign: true, cRLSign: true))
                    SubjectKeyIdentifier(hash: publicKey)
                },
                issuerPrivateKey: Certificate.PrivateKey(key)
            )
        } catch {
            throw .forging(reason: "CA certificate: \(error)")
        }
        let pem: String
        do {
            pem = try certificate.serializeAsPEM().pemString
        } catch {
            throw .forging(reason: "CA certificate encoding: \(error)")
        }
        // Key first: a certificate on disk without its key would block the next run.
        try writeAtomically(keyPath, contents: key.pemRepresentation + "\n", mode: 0o600)
        try writeAtomically(certificatePath, contents: pem + "\n", mode: 0o644)
        return SandboxCA(certificate: certificate, privateKey: key, certificatePath: certificatePath, keyPath: keyPath, created: true)
    }

    // MARK: - Files

    static func exists(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0
    }

    static func ensureDirectory(_ path: String) throws(TLSError) {
        var info = stat()
        if stat(path, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFDIR else { throw .stateDirectory(path: path, reason: "exists and is not a directory") }
            return
        }
        guard errno == ENOENT else { throw .stateDirectory(path: path, reason: errnoMessage()) }
        let parent = (path as NSString).deletingLastPathComponent
        if !parent.isEmpty, parent != path, !exists(parent) {
            try ensureDirectory(parent)
        }
        if mkdir(path, 0o700) != 0 && errno != EEXIST {
            throw .stateDirectory(path: path, reason: errnoMessage())
        }
    }

    static func checkKeyFile(_ path: String) throws(TLSError) {
        var info = stat()
        guard lstat(path, &info) == 0 else { throw .io(path: path, reason: errnoMessage()) }
        guard (info.st_mode & S_IFMT) == S_IFREG else { throw .invalidCA(path: path, reason: "not a regular file") }
        let mode = UInt32(info.st_mode) & 0o777
        if mode & 0o077 != 0 { throw .insecureKeyPermissions(path: path, mode: mode) }
        if info.st_uid != geteuid() { throw .keyNotOwned(path: path) }
    }

    static func readText(_ path: String) throws(TLSError) -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw .io(path: path, reason: "cannot read (\(errnoMessage()))")
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// Writes to a temporary file created with `mode` (never wider), fsyncs, then renames.
    static func writeAtomically(_ path: String, contents: String, mode: mode_t) throws(TLSError) {
        let temporary = path + ".tmp-\(getpid())"
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else { throw .io(path: temporary, reason: errnoMessage()) }
        let bytes = Array(contents.utf8)
        var written = 0
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
            if n < 0 {
                if errno == EINTR { continue }
                let reason = errnoMessage()
                close(fd)
                unlink(temporary)
                throw .io(path: temporary, reason: reason)
            }
            written += n
        }
        fchmod(fd, mode)  // umask may have narrowed it; never widen beyond `mode`.
        fsync(fd)
        close(fd)
        guard rename(temporary, path) == 0 else {
            let reason = errnoMessage()
            unlink(temporary)
            throw .io(path: path, reason: reason)
        }
    }

    static func errnoMessage() -> String { String(cString: strerror(errno)) }
}

/// An advisory lock on the state directory, so two `keyhole` processes starting at once
/// do not both create a CA.
struct StateLock {
    let fd: Int32

    init(directory: String) throws(TLSError) {
        let path = directory + "/.lock"
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .stateDirectory(path: directory, reason: SandboxCA.errnoMessage()) }
        while flock(fd, LOCK_EX) != 0 {
            if errno != EINTR {
                close(fd)
                throw .stateDirectory(path: directory, reason: SandboxCA.errnoMessage())
            }
        }
    }

    func release() {
        flock(fd, LOCK_UN)
        close(fd)
    }
}
