import ArgumentParser
import KeyholeTLS

struct CACommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca",
        abstract: "Manage the sandbox certificate authority (ECDSA P-256).",
        subcommands: [Init.self, Show.self, InstallScript.self]
    )

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create the sandbox CA if absent (key file mode 0600); an existing CA is kept.")

        @OptionGroup var state: StateOptions

        func run() throws {
            do {
                let ca = try SandboxCA.loadOrCreate(stateDirectory: state.resolved)
                Output.out(ca.created ? "created sandbox CA" : "sandbox CA already exists; kept it")
                Output.out("certificate: \(ca.certificatePath)")
                Output.out("private key: \(ca.keyPath) (mode 0600; never give it to a guest)")
                Output.out("SHA-256 fingerprint: \(ca.fingerprint)")
            } catch {
                Output.err("keyhole: \(error)")
                throw ExitCode(1)
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the CA certificate (PEM), for installing in a guest's trust store.")

        @OptionGroup var state: StateOptions

        func run() throws {
            do {
                let ca = try SandboxCA.load(stateDirectory: state.resolved)
                Output.out(ca.certificatePEM)
            } catch {
                Output.err("keyhole: \(error)")
                throw ExitCode(1)
            }
        }
    }

    struct InstallScript: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "install-script",
            abstract: "Print a POSIX sh script that makes a guest trust the sandbox CA.",
            discussion: """
                Run the script as root in the guest: it installs the CA in the system store \
                (Debian/Ubuntu, Alpine, RHEL/Fedora), writes SSL_CERT_FILE, REQUESTS_CA_BUNDLE, \
                CURL_CA_BUNDLE, GRPC_DEFAULT_SSL_ROOTS_FILE_PATH and NODE_EXTRA_CA_CERTS to \
                /etc/environment and /etc/profile.d/keyhole-ca.sh, and imports the CA into Java's \
                cacerts when keytool is there. For example:
                  keyhole ca install-script > keyhole-ca.sh; scp keyhole-ca.sh guest:; ssh guest sudo sh keyhole-ca.sh
                """)

        @OptionGroup var state: StateOptions

        func run() throws {
            do {
                let ca = try SandboxCA.load(stateDirectory: state.resolved)
                Output.out(CATrustKit.installScript(certificatePEM: ca.certificatePEM))
            } catch {
                Output.err("keyhole: \(error)")
                throw ExitCode(1)
            }
        }
    }
}
