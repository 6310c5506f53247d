/// The policy settings `keyhole run` and `keyhole proxy` take as flags, as the reference
/// pages' CLI does: `--secret GITHUB_TOKEN@api.github.com` (the value from the host's
/// `$GITHUB_TOKEN`), `--secret ENV=VALUE@HOST[,HOST…]`, `--secret-pattern ENV@*.domain`,
/// `--on-secret-violation ACTION`, and a few more. They stand alone or merge with a policy
/// file; a flag that says something else than the file does is an error naming both places.
///
/// Each flag is validated as a small policy document, so its problems carry the very
/// messages a file's would, prefixed by the flag (`--secret TOKEN@bad_host!: …`).
public struct CommandLinePolicy: Sendable {
    /// `--secret` arguments, in order.
    public var secrets: [String] = []
    /// `--secret-pattern` arguments, in order.
    public var secretPatterns: [String] = []
    public var onSecretViolation: String?
    public var name: String?
    /// `--upstream-ca` paths (relative ones resolve against `workingDirectory`).
    public var upstreamCA: [String] = []
    /// `--dns` resolver addresses.
    public var dns: [String] = []
    public var image: String?
    public var memoryMiB: Int?
    public var vcpus: Int?
    public var workingDirectory = "."

    public init() {}

    public var isEmpty: Bool {
        secrets.isEmpty && secretPatterns.isEmpty && onSecretViolation == nil && name == nil && upstreamCA.isEmpty && dns.isEmpty
            && image == nil && memoryMiB == nil && vcpus == nil
    }

    /// The name a policy gets when there is no file and no `--name`.
    public static let defaultName = "keyhole"

    /// How a `--secret` argument may be shown: an inline value becomes `…` (it is a
    /// credential, and this text goes into error messages).
    /// The hosts are shown only when they read as hosts (a value whose `@HOST` was
    /// forgotten must not show its tail), and a name only when it looks like a variable's
    /// (`ghp_…@api.github.com`, a token where the name belongs, is not repeated).
    public static func shown(_ flag: String, _ argument: String) -> String {
        let at = argument.lastIndex(of: "@") ?? argument.endIndex
        let hosts = at < argument.endIndex ? String(argument[argument.index(after: at)...]) : ""
        let hostsReadable = !hosts.isEmpty && hosts.split(separator: ",", omittingEmptySubsequences: false).allSatisfy { host in
            let name = HostName.normalize(host.hasPrefix("*.") ? host.dropFirst(2) : host)
            return HostName.problem(with: name) == nil
        }
        let tail = hostsReadable ? "@" + hosts : (at < argument.endIndex ? "@…" : "")
        guard let equals = argument[..<at].firstIndex(of: "=") else {
            let name = String(argument[..<at])
            return "\(flag) \(PolicyReader.looksLikeConventionalName(name) ? name : "…")\(tail)"
        }
        return "\(flag) \(argument[..<equals])=…\(tail)"
    }

    struct SecretFlag {
        var origin: String
        var env: String
        /// Given inline (`ENV=VALUE@HOST`); nil: from the host's environment variable ENV.
        var value: String?
        var hosts: [String] = []
        var patterns: [String] = []
    }

    /// `ENV@HOST[,HOST…]` or `ENV=VALUE@HOST[,HOST…]`; the value may itself hold `@` and
    /// `=` (the hosts follow the last `@`, the name ends at the first `=`).
    static func parse(_ flag: String, _ argument: String) throws(PolicyError) -> (env: String, value: String?, hosts: [String]) {
        let origin = shown(flag, argument)
        func failure(_ message: String) -> PolicyError { .invalid([PolicyDiagnostic(SourceLocation(file: origin, line: 0, column: 0), message)]) }
        let usage = flag == "--secret-pattern" ? "ENV@*.domain[,*.other]" : "ENV@HOST[,HOST…] or ENV=VALUE@HOST[,HOST…]"
        guard let at = argument.lastIndex(of: "@") else {
            throw failure("must be \(usage)")
        }
        let spec = argument[..<at]
        let hosts = argument[argument.index(after: at)...].split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        if hosts.contains(where: \.isEmpty) {
            throw failure("has an empty host; it must be \(usage)")
        }
        if flag == "--secret", let pattern = hosts.first(where: { $0.hasPrefix("*.") }) {
            throw failure("'\(pattern)' is a host pattern; give it as --secret-pattern ENV@\(pattern)")
        }
        if let equals = spec.firstIndex(of: "=") {
            // With a value inline, what follows the last @ is echoed only once it reads as
            // hosts: a value with an @ and no host would otherwise show its tail.
            if !hosts.allSatisfy({ HostName.problem(with: HostName.normalize($0.hasPrefix("*.") ? String($0.dropFirst(2)) : $0)) == nil }) {
                throw failure("what follows the last '@' is not a list of host names (a value holding '@' still ends with @HOST); the value is not shown")
            }
            return (String(spec[..<equals]), String(spec[spec.index(after: equals)...]), hosts)
        }
        return (String(spec), nil, hosts)
    }

    /// The flags merged with `file` (or alone, when it is nil). `environment` is what an
    /// `ENV@HOST` secret reads its value from (the process environment by default).
    public func apply(to file: Policy?, environment: [String: String]? = nil) throws(PolicyError) -> Policy {
        let loader = PolicyLoader(environment: environment)
        var problems: [PolicyDiagnostic] = []
        var warnings: [PolicyDiagnostic] = []
        func here(_ origin: String) -> SourceLocation { SourceLocation(file: origin, line: 0, column: 0) }
        /// One flag as a policy document of its own: the file's checks, the flag as origin.
        func validated(_ document: [(key: String, value: PolicyDocument)], origin: String) -> Policy? {
            do {
                let policy = try loader.load(
                    document: .map([("version", .int(1))] + document), origin: origin, baseDirectory: workingDirectory)
                warnings += policy.warnings
                return policy
            } catch {
                problems += error.diagnostics
                return nil
            }
        }
        func placeOf(_ key: String) -> SourceLocation? { file?.keyLocations[key] }

        var policy = file ?? Policy(name: Self.defaultName, secrets: [], file: "command line")

        if let name {
            if validated([("name", .string(name))], origin: "--name \(name)") != nil {
                if let place = placeOf("name"), file?.name != name {
                    problems.append(
                        PolicyDiagnostic(here("--name \(name)"), "the policy names the sandbox '\(policy.name)' at \(place); give the name in one place"))
                } else {
                    policy.name = name
                }
            }
        }

        // Secrets: the flags for one env make one secret.
        var flags: [SecretFlag] = []
        for (flag, arguments) in [("--secret", secrets), ("--secret-pattern", secretPatterns)] {
            for argument in arguments {
                let parsed: (env: String, value: String?, hosts: [String])
                do {
                    parsed = try Self.parse(flag, argument)
                } catch {
                    problems += error.diagnostics
                    continue
                }
                do {
                    let origin = Self.shown(flag, argument)
                    if let index = flags.firstIndex(where: { $0.env == parsed.env }) {
                        if let value = parsed.value, flags[index].value != value {
                            let message = flags[index].value == nil
                                ? "gives '\(parsed.env)' a value, but \(flags[index].origin) reads it from the host's $\(parsed.env); use one form"
                                : "gives '\(parsed.env)' another value than \(flags[index].origin)"
                            problems.append(PolicyDiagnostic(here(origin), message))
                            continue
                        }
                        if flag == "--secret" { flags[index].hosts += parsed.hosts } else { flags[index].patterns += parsed.hosts }
                    } else {
                        var entry = SecretFlag(origin: origin, env: parsed.env, value: parsed.value)
                        if flag == "--secret" { entry.hosts = parsed.hosts } else { entry.patterns = parsed.hosts }
                        flags.append(entry)
                    }
                }
            }
        }
        for flag in flags {
            var secret: [(key: String, value: PolicyDocument)] = [("env", .string(flag.env))]
            secret.append(flag.value.map { ("value", .string($0)) } ?? ("from_env", .string(flag.env)))
            if !flag.hosts.isEmpty { secret.append(("allow_hosts", .strings(flag.hosts))) }
            if !flag.patterns.isEmpty { secret.append(("allow_host_patterns", .strings(flag.patterns))) }
            guard let parsed = validated([("secrets", .list([.map(secret)]))], origin: flag.origin)?.secrets.first else { continue }
            if let other = policy.secrets.first(where: { $0.env == parsed.env }) {
                problems.append(
                    PolicyDiagnostic(
                        here(flag.origin), "secret '\(parsed.env)' is also defined at \(Self.place(of: other)); define it in one place"))
                continue
            }
            if policy.guest?.env.contains(where: { $0.name == parsed.env }) == true {
                problems.append(
                    PolicyDiagnostic(here(flag.origin), "'\(parsed.env)' is also a guest.env entry of \(policy.file); the secret's placeholder goes there"))
                continue
            }
            if let other = policy.secrets.first(where: { $0.placeholder.hasPrefix(parsed.placeholder) || parsed.placeholder.hasPrefix($0.placeholder) }) {
                let (short, long) = other.placeholder.count < parsed.placeholder.count ? (other.placeholder, parsed.placeholder) : (parsed.placeholder, other.placeholder)
                problems.append(
                    PolicyDiagnostic(
                        here(flag.origin),
                        "placeholder '\(parsed.placeholder)' and '\(other.placeholder)' (\(Self.place(of: other))) overlap: '\(short)' is a prefix of '\(long)'; give one of them a distinct 'placeholder' in a policy file"
                    ))
                continue
            }
            policy.secrets.append(parsed)
        }

        // Network.
        if let action = onSecretViolation {
            let origin = "--on-secret-violation \(action)"
            if let parsed = validated([("network", .map([("on_secret_violation", .string(action))]))], origin: origin)?.network.onSecretViolation {
                if let place = placeOf("network.on_secret_violation"), policy.network.onSecretViolation != parsed {
                    problems.append(
                        PolicyDiagnostic(
                            here(origin), "the policy sets on_secret_violation: \(policy.network.onSecretViolation.rawValue) at \(place); set it in one place"))
                } else {
                    policy.network.onSecretViolation = parsed
                }
            }
        }
        for path in upstreamCA {
            if let parsed = validated([("network", .map([("upstream_ca", .strings([path]))]))], origin: "--upstream-ca \(path)") {
                policy.network.upstreamCA += parsed.network.upstreamCA.filter { !policy.network.upstreamCA.contains($0) }
            }
        }
        for address in dns {
            if let parsed = validated([("network", .map([("dns", .strings([address]))]))], origin: "--dns \(address)") {
                policy.network.dns += parsed.network.dns.filter { !policy.network.dns.contains($0) }
            }
        }

        // Guest.
        var guest = policy.guest ?? GuestSpec()
        func guestSetting<T: Equatable>(_ key: String, _ flag: String, _ value: T?, document: (T) -> PolicyDocument, read: (GuestSpec) -> T, write: (inout GuestSpec, T) -> Void) {
            guard let value else { return }
            let origin = "\(flag) \(value)"
            guard let parsed = validated([("guest", .map([(key, document(value))]))], origin: origin)?.guest.map(read) else { return }
            if let place = placeOf("guest." + key), read(guest) != parsed {
                problems.append(PolicyDiagnostic(here(origin), "the policy sets guest.\(key): \(read(guest)) at \(place); set it in one place"))
            } else {
                write(&guest, parsed)
            }
        }
        if let image {
            let origin = "--image \(image)"
            if validated([("guest", .map([("image", .string(image))]))], origin: origin) != nil {
                if let place = placeOf("guest.kernel") {
                    problems.append(PolicyDiagnostic(here(origin), "the policy boots its own guest.kernel at \(place); choose one"))
                } else {
                    guest.image = .builtin
                }
            }
        }
        guestSetting("memory_mib", "--memory", memoryMiB, document: { .int($0) }, read: \.memoryMiB, write: { $0.memoryMiB = $1 })
        guestSetting("vcpus", "--vcpus", vcpus, document: { .int($0) }, read: \.vcpus, write: { $0.vcpus = $1 })
        if policy.guest != nil || image != nil || memoryMiB != nil || vcpus != nil { policy.guest = guest }

        guard problems.isEmpty else { throw .invalid(problems) }
        policy.warnings += warnings
        return policy
    }

    /// Where a secret was defined: `FILE:LINE:COL`, or the flag that gave it.
    static func place(of secret: Secret) -> String { secret.location?.description ?? "the policy" }
}
