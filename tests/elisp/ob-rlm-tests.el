;;; ob-rlm-tests.el --- ERT tests of ob-rlm.el against a real daemon  -*- lexical-binding: t; -*-

;;; Commentary:

;; See rlm-tests.el for the set-up: the scripted model answers
;; "babeltest" questions with "Babel says 42.".

;;; Code:

(require 'ert)
(require 'rlm-tests)
(require 'ob-rlm)

(defvar org-export-current-backend)
(defvar org-export-use-babel)

(defconst rlm-test-org
  "* Notes
The meaning is 42.
#+name: q
#+begin_src rlm :context subtree %s
babeltest: what is the meaning?
#+end_src
* Other
Unrelated.
"
  "An Org document with an rlm block; %s takes more header arguments.")

(defun rlm-test-babel-buffer (headers)
  "Fill the current buffer with `rlm-test-org' using HEADERS; go to the block."
  (insert (format rlm-test-org headers))
  (org-mode)
  (goto-char (point-min))
  (search-forward "#+begin_src")
  (beginning-of-line))

(ert-deftest rlm-test-babel-sync-block-gets-its-result ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (rename-buffer "rlm-test-babel.org" t)
      (rlm-test-babel-buffer ":max-iterations 5")
      (let ((org-confirm-babel-evaluate nil))
        ;; In batch, blocks run synchronously.
        (should (equal (org-babel-execute-src-block) "Babel says 42.")))
      (should (string-match-p "#\\+RESULTS: q\n: Babel says 42\\.\n" (buffer-string)))
      ;; :context subtree sent the subtree holding the block, and only it.
      (let ((names (rlm-context-names)))
        (should (cl-some (lambda (n)
                           (and (string-prefix-p "emacs:rlm-test-babel.org:" n)
                                (equal (rlm-test-context-text n)
                                       (format (substring rlm-test-org 0 (string-match "\\* Other" rlm-test-org))
                                               ":max-iterations 5"))))
                         names))))))

(ert-deftest rlm-test-babel-async-block-replaces-its-placeholder ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (rename-buffer "rlm-test-async.org" t)
      (rlm-test-babel-buffer ":async yes")
      (let ((org-confirm-babel-evaluate nil))
        (org-babel-execute-src-block))
      ;; At once: a placeholder, and Emacs is free.
      (should (string-match-p "#\\+RESULTS: q\n: rlm: waiting for the answer (job emacs-"
                              (buffer-string)))
      (should (rlm-test-wait-for
               (lambda () (string-match-p "#\\+RESULTS: q\n: Babel says 42\\.\n" (buffer-string)))
               60))
      (should-not (string-match-p "waiting for the answer" (buffer-string))))))

(ert-deftest rlm-test-babel-export-waits-for-the-answer ()
  (rlm-test-with-daemon
    (require 'ox-ascii)
    (let* ((org-confirm-babel-evaluate nil)
           (org-export-use-babel t)
           (out (org-export-string-as
                 (concat "* Notes\nThe meaning is 42.\n"
                         "#+begin_src rlm :context subtree :exports results\n"
                         "babeltest: what is the meaning?\n#+end_src\n")
                 'ascii t)))
      (should (string-match-p "Babel says 42\\." out))
      (should-not (string-match-p "waiting for the answer" out)))))

(ert-deftest rlm-test-babel-async-choice ()
  (let ((rlm-babel-async 'interactive))
    (should-not (rlm-babel--async-p '((:async . "no"))))
    (should (rlm-babel--async-p '((:async . "yes"))))
    ;; Interactive Emacs: async unless exporting.
    (let ((noninteractive nil))
      (should (rlm-babel--async-p nil))
      (let ((org-export-current-backend 'ascii))
        (should-not (rlm-babel--async-p nil))))
    ;; Batch: never async unless asked.
    (let ((noninteractive t))
      (should-not (rlm-babel--async-p nil))))
  (let ((rlm-babel-async t) (noninteractive t))
    (should (rlm-babel--async-p nil))))

(ert-deftest rlm-test-babel-context-by-name-and-by-path ()
  (rlm-test-with-daemon
    (let ((dir (make-temp-file (expand-file-name "babel" rlm-test-tmp) t))
          (org-confirm-babel-evaluate nil))
      (with-temp-file (expand-file-name "notes.txt" dir) (insert "file for babel\n"))
      (rlm-put-text "rlm-test:babel" "named text for babel")
      (dolist (spec (list "rlm-test:babel" "notes.txt"))
        (with-temp-buffer
          (setq default-directory (file-name-as-directory dir))
          (insert (format "#+begin_src rlm :context %s\nbabeltest: ?\n#+end_src\n" spec))
          (org-mode)
          (goto-char (point-min))
          (should (equal (org-babel-execute-src-block) "Babel says 42."))))
      ;; The file was read by the daemon under a files: name.
      (should (cl-some (lambda (n)
                         (and (string-prefix-p "files:" n)
                              (string-suffix-p "notes.txt" n)
                              (equal (rlm-test-context-text n) "file for babel\n")))
                       (rlm-context-names)))
      (rlm-drop "rlm-test:babel"))))

(ert-deftest rlm-test-babel-bad-context-is-a-clear-error ()
  (rlm-test-with-daemon
    (with-temp-buffer
      (insert "#+begin_src rlm :context no-such-thing-here\nbabeltest: ?\n#+end_src\n")
      (org-mode)
      (goto-char (point-min))
      (let* ((org-confirm-babel-evaluate nil)
             (err (should-error (org-babel-execute-src-block) :type 'user-error)))
        (should (string-match-p ":context no-such-thing-here is neither"
                                (error-message-string err)))))))

(ert-deftest rlm-test-babel-header-arguments-become-options ()
  (should (equal (rlm-babel--options '((:model . "big") (:sub-model . "small")
                                       (:max-iterations . 7) (:depth . "2")
                                       (:timeout . 30)))
                 '(:root_model "big" :sub_model "small" :max_iterations 7
                               :max_depth 2 :timeout_s 30))))

(provide 'ob-rlm-tests)
;;; ob-rlm-tests.el ends here
